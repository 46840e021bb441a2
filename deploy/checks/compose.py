"""Checks docker-compose.yml without a Docker engine (`docker compose config`
needs the compose plugin, which CI does not have): every service has an
image or a build whose Dockerfile has the named target; bind-mounted files
exist; named volumes are declared; secrets are declared, from files that
exist; published host ports are unique and not
on replicated services; depends_on names real services, and
`service_healthy` ones have a health check; Prometheus scrapes hosts that
are services."""

import os
import re
import sys

import yaml

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def dockerfile_targets(path):
    with open(path, encoding="utf-8") as file:
        return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", file.read(), re.M | re.I))


def host_port(spec):
    """The host side of a published port: "127.0.0.1:3000:3000" -> "127.0.0.1:3000"."""
    if isinstance(spec, dict):
        return f"{spec.get('host_ip', '')}:{spec.get('published')}" if spec.get("published") else None
    parts = str(spec).split(":")
    if len(parts) == 1:
        return None  # container port only: Docker picks a free host port
    return ":".join(parts[:-1])


def problems(root, compose, scraped_hosts):
    services = compose.get("services") or {}
    if not services:
        yield "no services"
    volumes = set((compose.get("volumes") or {}).keys())
    secrets = compose.get("secrets") or {}
    for name, secret in secrets.items():
        source = (secret or {}).get("file")
        if not source or not os.path.isfile(os.path.join(root, source)):
            yield f"secret {name}: no file {source!r}"
    published = {}
    for name, service in services.items():
        where = f"service {name}"
        build = service.get("build")
        if not service.get("image") and not build:
            yield f"{where}: neither image nor build"
        if build:
            build = {"context": build} if isinstance(build, str) else build
            context = os.path.join(root, build.get("context", "."))
            dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(dockerfile):
                yield f"{where}: no {dockerfile}"
            elif build.get("target") and build["target"] not in dockerfile_targets(dockerfile):
                yield f"{where}: {dockerfile} has no stage {build['target']!r}"
        for volume in service.get("volumes", []):
            source = (volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0])
            if source.startswith((".", "/")):
                if not os.path.exists(os.path.join(root, source)):
                    yield f"{where}: mounts {source}, which does not exist"
            elif source and source not in volumes:
                yield f"{where}: volume {source!r} is not declared under volumes"
        for secret in service.get("secrets", []):
            secret = secret.get("source") if isinstance(secret, dict) else secret
            if secret not in secrets:
                yield f"{where}: secret {secret!r} is not declared under secrets"
        replicas = (service.get("deploy") or {}).get("replicas", 1)
        for port in service.get("ports", []):
            host = host_port(port)
            if host is None:
                continue
            if replicas > 1:
                yield f"{where}: {replicas} replicas cannot share host port {host}"
            if host in published:
                yield f"{where}: host port {host} already published by {published[host]}"
            published[host] = name
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for other, how in depends.items():
            if other not in services:
                yield f"{where}: depends on unknown service {other!r}"
                continue
            condition = (how or {}).get("condition", "service_started")
            if condition not in CONDITIONS:
                yield f"{where}: unknown condition {condition!r}"
            if condition == "service_healthy" and "healthcheck" not in services[other]:
                yield f"{where}: waits for {other} to be healthy, but {other} has no healthcheck"
    for host in scraped_hosts:
        if host not in services:
            yield f"Prometheus scrapes {host!r}, which is no service"


def prometheus_hosts(path):
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    for job in config.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                yield target.rsplit(":", 1)[0]
        for dns in job.get("dns_sd_configs", []):
            yield from dns.get("names", [])


def main(path, prometheus):
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as file:
        compose = yaml.safe_load(file)
    found = list(problems(root, compose, set(prometheus_hosts(prometheus))))
    for problem in found:
        print(f"{path}: {problem}")
    if not found:
        print(f"{path}: {len(compose['services'])} services OK")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
