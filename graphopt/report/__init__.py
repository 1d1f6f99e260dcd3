"""Model report: where time and bytes go, what each pass changed, changes simulated before they are applied."""
