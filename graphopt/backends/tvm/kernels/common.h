/* What graphopt's C dense kernels share: a per-thread scratch buffer, the split of a matmul's
 * 16-column panels into tasks, and (GRAPHOPT_AMX) the AMX permission and tile configuration. */
#ifndef GRAPHOPT_KERNELS_COMMON_H
#define GRAPHOPT_KERNELS_COMMON_H
#define _GNU_SOURCE                 /* syscall() under -std=c11 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* This thread's scratch buffer `slot` (0 to 3) of at least `bytes` (64-byte aligned, kept
 * between calls). */
static void *thread_scratch(int slot, size_t bytes) {
    static __thread void *buffers[4];
    static __thread size_t capacity[4];
    if (bytes > capacity[slot]) {
        free(buffers[slot]);
        capacity[slot] = (bytes + 63) / 64 * 64;
        buffers[slot] = aligned_alloc(64, capacity[slot]);
    }
    return buffers[slot];
}

/* Task `task` of `tasks` gets panels [*first, *end) of n / 16, in whole pairs (AMX's two
 * panels a block): pairs, not the register kernels' blocks of 4, so that two tasks of a matmul
 * 576 or 192 wide get equal shares (measured: docs/measurements/decisions.md). */
static int task_panels(int64_t n, int64_t task, int64_t tasks, int64_t *first, int64_t *end) {
    const int64_t groups = (n / 16 + 1) / 2;
    const int64_t group_end = groups * (task + 1) / tasks * 2;
    *first = groups * task / tasks * 2;
    *end = group_end < n / 16 ? group_end : n / 16;
    return *end > *first;
}

#ifdef GRAPHOPT_AMX
#include <sys/syscall.h>
#include <unistd.h>

/* Linux grants AMX tile data per process on request (ARCH_REQ_XCOMP_PERM, XTILEDATA). */
__attribute__((constructor)) static void request_amx_permission(void) {
    syscall(SYS_arch_prctl, 0x1023, 18);
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles of 64-byte rows: C 0..3 = (row tile, panel) accumulators, A 4..5 = X row tiles of
 * rows0 and rows1 rows, B 6..7 = two panels' 16 rows. */
static void configure_tiles(int rows0, int rows1) {
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    int tile_rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = (uint8_t)tile_rows[t];
        config.colsb[t] = tile_rows[t] ? 64 : 0;
    }
    _tile_loadconfig(&config);
}
#endif
#endif
