"""Checks Grafana dashboards: valid JSON, unique panel ids, panels inside the
24-column grid and not overlapping, every query on the dashboard's data
source, and every $variable a query uses defined. Whether the metric names
exist is the observability integration test's job (it scrapes them)."""

import json
import re
import sys

BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


def problems(dashboard):
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if not dashboard.get("uid"):
        yield "no uid (provisioning needs a stable one)"
    ids, cells = set(), {}
    for panel in dashboard.get("panels", []):
        title = panel.get("title", "?")
        if panel["id"] in ids:
            yield f"panel {title!r}: id {panel['id']} used twice"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        if grid["x"] < 0 or grid["x"] + grid["w"] > 24:
            yield f"panel {title!r}: outside the 24-column grid"
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        overlapped = {cells[cell] for cell in area if cell in cells}
        if overlapped:
            yield f"panel {title!r} overlaps {sorted(overlapped)}"
        cells.update(dict.fromkeys(area, title))
        if panel["type"] == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            yield f"panel {title!r}: not on the $datasource variable"
        if not panel.get("targets"):
            yield f"panel {title!r}: no query"
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if not expr.strip():
                yield f"panel {title!r}: empty query {target.get('refId')}"
            for used in re.findall(r"\$\{?(\w+)", expr):
                if used not in variables | BUILTIN_VARIABLES:
                    yield f"panel {title!r}: undefined variable ${used}"


def main(paths):
    failed = False
    for path in paths:
        with open(path, encoding="utf-8") as file:
            try:
                dashboard = json.load(file)
            except json.JSONDecodeError as error:
                print(f"{path}: not JSON: {error}")
                failed = True
                continue
        found = list(problems(dashboard))
        for problem in found:
            print(f"{path}: {problem}")
        failed |= bool(found)
        if not found:
            print(f"{path}: {len(dashboard['panels'])} panels OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
