"""Offline batch jobs on RQ (``ryzanstein batch``); see docs/GATEWAY.md, "Batch jobs".

``lines`` reads input lines and writes result records, ``job`` is the job RQ runs, ``queue`` the RQ
glue (queue, ``BatchWorker``, job state), ``cli`` the verbs. Nothing is imported here.
"""
