"""The jobs' orchestration: CLI parsing, presets, the workload (data + models), certify and predict end to end,
the reduce of counts to results, and the report. The only package that imports all the others."""
