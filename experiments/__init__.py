"""absl experiment binaries: flags -> a validated config -> `run(config, workdir)` of
`kvtpu.models.runs`, which writes `config.json`, `results.jsonl`, `report.md` and plots
to `--workdir`."""
