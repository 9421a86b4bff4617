"""orchestrator: many trials on disk, without Ray and without torch.

- `space`: search-space YAML -> validated `SweepSpace` of `Cell`s with stable trial ids;
- `plan`: the grid plus the recorded search samples, and which trials a run still has to run;
- `record`: the one reader and writer of `results/<sweep>/` (plan, trial states, locks, heartbeat);
- `progress`: the progress line, ETA and `status` text;
- `preflight`: input, address, folder and shared-storage checks before anything is written.

`sweep.py` turns these into Ray Tune calls; `reports/` reads results through `record`.
"""
