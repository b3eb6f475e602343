"""python -m cfae.recommend: a saved model's top-k items for one user, as a table.

    python -m cfae.recommend run=<MLflow run id> user=42 k=10
    python -m cfae.recommend path=outputs/<day>/<time> user=42 seen=true   # rated items may come back
    python -m cfae.recommend run=<id> user=42 uri=http://mlflow-host:5000

`run=` takes a run id or a runs:/ URI (store: `uri=`, else $MLFLOW_TRACKING_URI, else
sqlite:///mlruns/mlflow.db); `path=` a run's output folder or its `recommender/` folder.
"""

from __future__ import annotations

import sys

from cfae.checks import UsageError, reported_in_one_line
from cfae.console import quiet_libraries

KEYS = {"run": None, "path": None, "user": None, "k": "10", "seen": "false", "uri": None}


def parse(argv: list[str]) -> dict[str, str | None]:
    args = dict(KEYS)
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or key not in KEYS:
            raise UsageError(f"{token}: expected one of {', '.join(f'{k}=' for k in KEYS)} (python -m cfae.recommend "
                             f"run=<run id> user=<user id> [k=10])")
        args[key] = value
    if (args["run"] is None) == (args["path"] is None):
        raise UsageError("give the model as run=<MLflow run id> or path=<folder>, one of the two")
    if not args["user"]:
        raise UsageError("user= is missing (the user's id in the data)")
    from cfae.recommender import check_k

    check_k(int(args["k"]) if args["k"].lstrip("-").isdigit() else args["k"])
    if args["seen"] not in ("true", "false"):
        raise UsageError(f"seen={args['seen']}: must be true or false")
    return args


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    with reported_in_one_line():
        args = parse(sys.argv[1:] if argv is None else argv)
        from cfae.recommender import load

        rec = load(args["run"] or args["path"], tracking_uri=args["uri"])
        user, k = rec.as_id(args["user"], "user"), int(args["k"])
        known = user in rec.user_index
        table = rec.recommend(user, k, exclude_seen=args["seen"] == "false")
    if known:
        unrated = ", unrated items only" if args["seen"] == "false" else ""
        print(f"top {len(table)} for user {user} (predicted ratings{unrated})")
    else:
        print(f"user {user} is not in the model's data: the {len(table)} items with the most good ratings (their "
              f"mean ratings)")
    width = max([4, *(len(str(r.item_id)) for r in table)])
    print(f"{'rank':>4}  {'item':>{width}}  {'rating':>6}  title")
    for r in table:
        print(f"{r.rank:>4}  {r.item_id!s:>{width}}  {r.rating:>6.3f}  {r.title}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
