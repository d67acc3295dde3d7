"""What the experiment binaries run: one module per binary, each a frozen, validated config
and `run(config, workdir)`.

  calibrate     CalibrateConfig, run     scales or clip ratios of a format, with the
                                         outlier report and the artifact
  evaluate      EvaluateConfig, run      accuracy of each KV precision (score and passkey
                                         rows, calibration transfer, targets)
  headroom      HeadroomConfig, run      the longest context / most sequences that fit
  generate      GenerateConfig, run      completions and prefill/decode throughput
  model_bench   ModelBenchConfig, run    whole-model throughput per format and context
  kernel_bench  KernelBenchConfig, run   attention timing and HBM traffic per format
  demo          DemoConfig, run          bytes and attention error per format (synthetic)
  summary       SummaryConfig, run       one table joining an evaluate and a headroom run:
                                         capacity and accuracy cost of each KV config

A config checks every field when it is made (`ConfigError` names the field, which is
also the binary's flag) and holds no expensive state; `run` checks the workdir rule
(`common.check_workdir`: a new or empty workdir unless told to overwrite or resume),
then what needs the model or data, before any calibration, compile or scoring; it
writes config.json first, appends result rows to results.jsonl as they finish, logs
progress with an ETA (`common.Progress`), and writes report.md and plots atomically.
The evaluate and headroom runs resume an interrupted run from its rows. Tests call `run`
in process; the binaries in `kvtpu.experiments` parse flags into a config and call it.
"""
