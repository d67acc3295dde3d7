"""absl experiment binaries: short `main()`s around library functions, writing
`config.json`, `results.jsonl` and `report.md` to `--workdir`."""
