"""`disaggserve`: the operator's command line (crd, render, plan, operator, up, ...)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from disaggserve.api.crd import dump_yaml, render_crd_yaml
from disaggserve.api.files import ResourceFileError, load_resource

Command = Callable[[argparse.Namespace], int]


def fail(message: str, code: int = 2) -> int:
    print(f"disaggserve: error: {message}", file=sys.stderr)
    return code


def _cmd_crd(args: argparse.Namespace) -> int:
    text = render_crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from disaggserve.planner import PlanningError, plan_for
    from disaggserve.resources import Owner, RenderError, build_children

    try:
        resource = load_resource(args.file, args.namespace)
    except ResourceFileError as e:
        return fail(str(e))
    try:
        plan = plan_for(resource.spec)
        objects = build_children(Owner(resource.name, resource.namespace), resource.spec, plan)
    except (PlanningError, RenderError) as e:
        return fail(str(e), code=1)
    sys.stdout.write("---\n".join(dump_yaml(obj) for obj in objects))
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    import disaggserve.controller  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, debug=False)
    clusterwide = args.all_namespaces or not args.namespace
    asyncio.run(
        kopf.operator(
            clusterwide=clusterwide,
            namespaces=[] if clusterwide else args.namespace,
            standalone=args.peering is None,
            peering_name=args.peering,
            liveness_endpoint=args.liveness,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disaggserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crd = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the API models")
    crd.add_argument("-o", "--output", help="write to this file instead of stdout")
    crd.set_defaults(func=_cmd_crd)

    render = sub.add_parser("render", help="print every object the operator would create for a resource")
    render.add_argument("-f", "--file", required=True, help="a YAML file with one DisaggServe")
    render.add_argument("-n", "--namespace", help="override metadata.namespace")
    render.set_defaults(func=_cmd_render)

    op = sub.add_parser("operator", help="run the operator (kopf) against the current kubeconfig or in-cluster")
    op.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    op.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    op.add_argument("--peering", help="kopf peering name for high availability (replicas elect one leader)")
    op.add_argument("--liveness", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=_cmd_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
