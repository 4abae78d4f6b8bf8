"""Tensor-parallel worker groups: K rank processes holding one model between them.

Rank 0, the leader, is the worker group of ``gpu_workers.group``: it talks to Redis, schedules,
samples and publishes. Ranks 1..K-1, the followers, only compute: each step the leader broadcasts
what they need to run the same ``ModelRunner.run`` on their shards, and the layers' collectives
(``gpu_workers.model.layers``) combine the shards' results.

- ``launch``: starting the ranks (``--tp K`` spawns them; torchrun starts them across hosts) and
  their process groups;
- ``step_message``: the step broadcast, as diffs against what followers already know;
- ``channel``: carrying step messages, pings while idle, and turning a dead or hung peer into
  ``EngineFailed``;
- ``runner``: the leader's runner (broadcast, then compute) and the followers' loop.
"""
