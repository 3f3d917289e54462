"""``zopro-analyze RUN_DIR``: write a trajectory-analysis report for a recorded run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zopro-analyze",
        description="Analyse the policy and reward LoRA trajectories of a run recorded with "
        "zopro_kernels.analysis.TrajectoryRecorder (RUN_DIR/trajectory/index.json) and write a "
        "report folder: metrics (CSV, JSON), PNG figures, an interactive HTML page and summary.md.",
    )
    parser.add_argument(
        "run_dir", type=Path, help="run directory (holding trajectory/index.json, or index.json itself)"
    )
    parser.add_argument("-o", "--output", type=Path, default=None, help="report folder (default: RUN_DIR/analysis)")
    parser.add_argument(
        "--projections",
        default="pca",
        help="comma-separated projection methods: pca (built in), umap (needs umap-learn), tsne (needs openTSNE), "
        "or 'all' (default: pca)",
    )
    parser.add_argument("--dims", default="2,3", help="projection dimensions, comma-separated (default: 2,3)")
    parser.add_argument("--no-per-layer", action="store_true", help="global metrics only (faster for many tensors)")
    parser.add_argument(
        "--common-names",
        action="store_true",
        help="use only tensor names both roles have (default: differing names are an error)",
    )
    parser.add_argument(
        "--absolute",
        action="store_true",
        help="project absolute weights (default: each role's displacement from its first snapshot)",
    )
    parser.add_argument(
        "--float32", action="store_true", help="hold snapshots in float32 (half the memory of the float64 default)"
    )
    parser.add_argument("--no-html", action="store_true", help="skip the interactive HTML page")
    parser.add_argument("--permutations", type=int, default=199, help="permutations for distance-correlation p-values")
    parser.add_argument("--seed", type=int, default=0, help="seed of permutations and of UMAP/t-SNE")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="first write a synthetic run with ZOPrO's structure into RUN_DIR (a demo / smoke test)",
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Imported here so that --help works, and errors are clean, without matplotlib/scipy loaded.
    from .projection import METHODS, MissingDependencyError
    from .report import write_report
    from .trajectory import TrajectoryError

    methods = (
        list(METHODS) if args.projections == "all" else [m.strip() for m in args.projections.split(",") if m.strip()]
    )
    try:
        dims = tuple(int(d) for d in args.dims.split(","))
    except ValueError:
        print(f"zopro-analyze: --dims must be integers such as 2,3, got {args.dims!r}", file=sys.stderr)
        return 2
    if args.synthetic:
        from .synthetic import write_synthetic_run

        write_synthetic_run(args.run_dir)
    try:
        paths = write_report(
            args.run_dir,
            args.output,
            methods=methods,
            dims=dims,
            per_layer=not args.no_per_layer,
            common_names=args.common_names,
            html=not args.no_html,
            permutations=args.permutations,
            seed=args.seed,
            relative=not args.absolute,
            float32=args.float32,
        )
    except (TrajectoryError, MissingDependencyError, ValueError) as error:
        print(f"zopro-analyze: {error}", file=sys.stderr)
        return 2
    print(f"report written to {paths['summary'].parent}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
