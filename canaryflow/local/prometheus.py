"""Prometheus for the embedded stack: Debian's binary, a rendered config, our recording rules
(deployments/prometheus/rules.yml: the dashboards' group and `LEVEL_RULES`).

Starting is quick (<0.3 s to ready) but the first scrape lands ~5 s later whatever the
interval, so callers start it once and `wait_for_targets` before they trust a query. Targets
change through `reload` (config rewrite + POST /-/reload, lifecycle API), never a restart, so
the TSDB and its history survive a new canary joining.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import yaml

from canaryflow.errors import StackError
from canaryflow.local.processes import ManagedProcess, free_port, http_ok

BINARY = "/usr/bin/prometheus"
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"
REPO_RULES = Path(__file__).resolve().parents[2] / "deployments" / "prometheus" / "rules.yml"

Targets = Mapping[str, Sequence[str]]

_BY = "service, version, role"
_ERRORS = 'canaryflow_requests_total{status=~"5..|429|408"}'
_TOKENS = f"{_BY}, gen_ai_token_type"
# The rules.yml group "canaryflow-levels": Prometheus' `level:metric:operations` names (level:
# the labels kept; metric: the series, `_total` dropped; operations: newest first), over the
# canaryflow_* and the OpenTelemetry GenAI series. PromQL gates and dashboards read them.
LEVEL_RULES = {
    "service_version_role:canaryflow_requests:rate1m":
        f"sum by ({_BY}) (rate(canaryflow_requests_total[1m]))",
    "service_version_role:canaryflow_request_errors_per_requests:ratio_rate1m":
        f"sum by ({_BY}) (rate({_ERRORS}[1m])) "
        f"/ sum by ({_BY}) (rate(canaryflow_requests_total[1m]))",
    "service_version_role:gen_ai_client_operation_duration_seconds:p95_rate1m":
        f"histogram_quantile(0.95, sum by ({_BY}, le) "
        "(rate(gen_ai_client_operation_duration_seconds_bucket[1m])))",
    "service_version_role_gen_ai_token_type:gen_ai_client_token_usage:rate1m":
        f"sum by ({_TOKENS}) (rate(gen_ai_client_token_usage_sum[1m]))",
    "service_version_role_gen_ai_token_type:gen_ai_client_token_usage_per_operation:ratio_rate1m":
        f"sum by ({_TOKENS}) (rate(gen_ai_client_token_usage_sum[1m])) "
        f"/ sum by ({_TOKENS}) (rate(gen_ai_client_token_usage_count[1m]))",
}  # fmt: skip


def render_config(
    targets: Targets, scrape_interval: str, rule_files: Sequence[str] = ()
) -> dict[str, object]:
    """prometheus.yml as data: one job per key, static `host:port` targets."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": list(rule_files),
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(hosts)}],
            }
            for job, hosts in sorted(targets.items())
        ],
    }


class PrometheusServer:
    """One Prometheus on 127.0.0.1 under `home`; `stop()` ends it and whatever it started."""

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        targets: Targets | None = None,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] | None = None,
        binary: str = BINARY,
    ) -> None:
        self.home = Path(home)
        self.port = port or free_port()
        self.targets: dict[str, list[str]] = {k: list(v) for k, v in (targets or {}).items()}
        self.scrape_interval = scrape_interval
        if rule_files is None:
            rule_files = [REPO_RULES] if REPO_RULES.is_file() else []
        self.rule_files = list(rule_files)
        self.binary = binary
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.home / "prometheus.yml"

    def write_config(self) -> Path:
        """Rules are copied next to the config, so the folder is complete on its own."""
        self.home.mkdir(parents=True, exist_ok=True)
        names = []
        for i, source in enumerate(self.rule_files):
            target = self.home / f"rules-{i}-{source.name}"
            shutil.copyfile(source, target)
            names.append(target.name)
        config = render_config(self.targets, self.scrape_interval, names)
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(config, sort_keys=False))
        temporary.replace(self.config_path)
        return self.config_path

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        if not Path(self.binary).is_file():
            raise StackError(
                f"Prometheus is not installed ({self.binary} is missing): run `{INSTALL_HINT}`"
            )
        self.write_config()
        self.process = ManagedProcess(
            name="prometheus",
            command=[
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.home / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            log_path=self.home / "prometheus.log",
            ready=http_ok(f"{self.url}/-/ready"),
            cwd=self.home,
        ).start(timeout_s)
        return self

    def reload(self, targets: Targets | None = None) -> None:
        """Rewrite the config (new targets, same rules) and have the running server reread it."""
        if targets is not None:
            self.targets = {k: list(v) for k, v in targets.items()}
        self.write_config()
        response = httpx.post(f"{self.url}/-/reload", timeout=10.0)
        if response.status_code != 200:
            raise StackError(
                f"Prometheus refused the new config ({response.status_code}): "
                f"{response.text.strip()}; see {self.config_path}"
            )

    def wait_for_targets(self, timeout_s: float = 30.0) -> None:
        """Block until every configured target has been scraped successfully (`up` == 1)."""
        wanted = {(job, host) for job, hosts in self.targets.items() for host in hosts}
        deadline = time.monotonic() + timeout_s
        missing = wanted
        while time.monotonic() < deadline:
            up = set()
            try:
                body = httpx.get(
                    f"{self.url}/api/v1/query", params={"query": "up == 1"}, timeout=5.0
                ).json()
                for row in body.get("data", {}).get("result", []):
                    up.add((row["metric"].get("job"), row["metric"].get("instance")))
            except (httpx.HTTPError, ValueError):
                pass
            missing = wanted - up
            if not missing:
                return
            time.sleep(0.2)
        shown = ", ".join(f"{job}/{host}" for job, host in sorted(missing))
        raise StackError(
            f"Prometheus did not scrape {shown} within {timeout_s:.0f} s: is the target "
            f"serving /metrics? See {self.url}/targets"
        )

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
