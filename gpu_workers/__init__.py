"""Worker groups: the model engine and the service loop that feeds it from Redis.

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the operator chose a policy: libgomp
(torch's CPU threads) reads it once, when torch is first imported, and its default spin-waiting
collapses decode speed on a loaded host (gpu_workers/cpu_threads.py has the figures).
"""

import os as _os

# Whether the policy is ours, not the operator's: a tool that starts other programs from a process that
# imported this package (benchmarks/llama_cpp.py's llama-server) leaves it out of their environment.
WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in _os.environ
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
