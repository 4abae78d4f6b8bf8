"""The operator's tools: the ``ryzanstein`` command and what runs or inspects a deployment.

``cli`` is the one command (every role's subcommand, ``python -m ryzanstein`` too), ``stack`` is
``ryzanstein up`` (embedded Redis, a balancer and N groups as one supervised process tree; ``Stack``
for programs, tests and benchmarks), ``status`` the status view, ``health`` the probe command,
``demo`` the demo. This package stands on all the others; none imports it.

The clients stay in ``producer/``: ``Client``/``AsyncClient``, ``submit``, and the two front ends
that put requests on the pipeline for users who do not speak the protocol, the OpenAI-compatible
gateway (``producer/gateway``) and batch jobs on RQ (``producer/batch``). Both hold no pipeline
state, reach Redis only through ``producer.client`` and run next to a deployment as its users'
entry point, so they count as clients even though the gateway listens on a port. Nothing is
imported here.
"""
