"""The echo function RQ runs in the pipeline benchmark's baseline."""


def echo(prompt: str) -> str:
    return prompt
