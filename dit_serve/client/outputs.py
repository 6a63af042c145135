"""Where a job's outputs are saved: one file per output, named from a directory, a path or a pattern."""

from pathlib import Path

from dit_serve.schemas import JobBody

INDEX_FIELD = "{index}"


def output_paths(job: JobBody, target: str | Path) -> list[Path]:
    """A path for each output of `job`.

    - an existing directory: `<dir>/<job id>-<index>.<format>`;
    - a pattern with `{index}` (e.g. `shots/cat-{index}.png`): the index filled in;
    - a plain path: itself for a single output; for several, `-<index>` before the suffix
      (`out.png` gives `out-0.png`, `out-1.png`, ...).
    """
    count = len(job.outputs)
    text = str(target)
    if Path(text).is_dir():
        extension = job.request.output_format.value
        return [Path(text) / f"{job.id}-{index}.{extension}" for index in range(count)]
    if INDEX_FIELD in text:
        return [Path(text.replace(INDEX_FIELD, str(index))) for index in range(count)]
    path = Path(text)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]
