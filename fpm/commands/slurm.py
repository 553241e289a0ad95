"""`fpm slurm render|submit`: a ready batch script for a recipe and cluster shape, written, shown
(``--dry-run``) or submitted."""

from __future__ import annotations

from pathlib import Path

from fpm.cluster import render, sbatch
from fpm.console import info


def slurm_command(kind: str, name: str, fpm_args: list[str], *, out: Path | None, dry_run: bool, submit: bool,
                  **shape) -> str | None:
    if kind == "pretrain":
        from fpm.config import load_recipe

        load_recipe(name, kind="pretrain")  # a typo in the recipe name fails here, not on the cluster
    script = render(kind, [name, *fpm_args], **shape)
    if dry_run:
        print(script, end="")
        if submit:
            print(f"# would run: sbatch --parsable {out or '<script>'}")
        return None
    path = Path(out) if out else Path("slurm-jobs") / f"{kind}-{name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    info(f"wrote {path}")
    if submit:
        job = sbatch(path)
        info(f"submitted job {job}")
        return job
    return None
