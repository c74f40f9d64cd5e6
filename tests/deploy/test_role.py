"""The Ansible role's contract, without a host: every default is specified in
meta/argument_specs.yml and every specified variable has a default or is required, the
playbooks parse, and the rendered configuration and policy are what Tollgate accepts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.policy.rules import parse_rules

yaml = pytest.importorskip("yaml")  # PyYAML comes with ansible-core

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "tollgate"
BIN = os.path.dirname(sys.executable)

needs_ansible = pytest.mark.skipif(shutil.which("ansible-playbook", path=BIN) is None,
                                   reason="ansible-core is not installed (the test extra)")


def specs() -> dict:
    return yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]


def test_every_default_is_specified_and_every_option_has_a_default_or_is_required() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    options = specs()["main"]["options"]
    assert set(defaults) - set(options) == set()
    for name, option in options.items():
        assert name.startswith("tollgate_"), name
        assert option.get("description"), name
        assert option.get("required") or name in defaults, name
    # The uninstall entry point's options are the role's too, with the same defaults.
    for name, option in specs()["uninstall"]["options"].items():
        assert name in defaults and option.get("default") == defaults[name], name


def test_handlers_are_notified_by_topic() -> None:
    handlers = yaml.safe_load((ROLE / "handlers" / "main.yml").read_text())
    topics = set()
    for handler in handlers:
        listen = handler["listen"]
        topics.update([listen] if isinstance(listen, str) else listen)
    notified = set()
    for tasks in (ROLE / "tasks").glob("*.yml"):
        for task in yaml.safe_load(tasks.read_text()) or []:
            if "notify" in task:
                notified.update([task["notify"]] if isinstance(task["notify"], str) else task["notify"])
    assert notified and notified <= topics


def run_playbook(tmp_path: Path, playbook: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_HOME": str(tmp_path / "home"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_NOCOLOR": "1",
           "PATH": BIN + os.pathsep + os.environ["PATH"]}
    return subprocess.run([os.path.join(BIN, "ansible-playbook"), playbook, *args], cwd=ANSIBLE_DIR, env=env,
                          capture_output=True, text=True, check=False, timeout=300)


@needs_ansible
@pytest.mark.parametrize("playbook", ["site.yml", "uninstall.yml"])
def test_playbooks_parse(tmp_path: Path, playbook: str) -> None:
    result = run_playbook(tmp_path, playbook, "--syntax-check", "-i", "inventory/example/hosts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


RENDER = """
- hosts: localhost
  gather_facts: false
  vars_files: [vars.json]
  tasks:
    - ansible.builtin.template:
        src: "{{ role_templates }}/{{ item }}.j2"
        dest: "{{ out }}/{{ item }}"
      loop: [tollgate.toml, policy.toml]
"""


@needs_ansible
def test_templates_render_what_tollgate_accepts(tmp_path: Path) -> None:
    """The example group vars, rendered by the role's templates, load as a config and a
    policy; a password never appears in the config."""
    group_vars = yaml.safe_load((ANSIBLE_DIR / "inventory/example/group_vars/tollgate_gateways.yml").read_text())
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    variables = {**defaults, **group_vars, "ansible_host": "192.0.2.11", "inventory_hostname": "gw-1",
                 "tollgate_agent_subnets": ["10.20.1.0/24"], "tollgate_agent_interfaces": ["ens4"],
                 "vault_payments_app_password": "s3cret-not-in-config", "out": str(tmp_path),
                 "tollgate_config_dir": str(tmp_path)}
    for key in ("tollgate_audit_origin", "tollgate_wheelhouse", "tollgate_systemd_dir", "tollgate_install_guide",
                "tollgate_audit_root_key_dir"):
        variables.pop(key)
    variables["tollgate_audit_origin"] = "tollgate/gw-1"
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    playbook = tmp_path / "render.yml"
    playbook.write_text(RENDER)
    env_roles = ROLE / "templates"
    result = run_playbook(tmp_path, str(playbook), "-i", "localhost,", "-c", "local",
                          "-e", f"ansible_python_interpreter={sys.executable}",
                          "-e", f"@{tmp_path / 'vars.json'}", "-e", f"role_templates={env_roles}")
    assert result.returncode == 0, result.stdout + result.stderr
    config_text = (tmp_path / "tollgate.toml").read_text()
    assert "s3cret" not in config_text
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "payments-app").write_text("s3cret-not-in-config\n")  # the role's copy task
    config = parse_config(config_text, tmp_path / "tollgate.toml")
    assert [t.name for t in config.targets] == ["payments"]
    assert config.intercept.agent_interfaces == ("ens4",)
    assert config.flows.mode == "off"
    assert config.audit is not None and config.audit.origin == "tollgate/gw-1"
    rules = parse_rules((tmp_path / "policy.toml").read_text(), tmp_path / "policy.toml")
    assert [r.name for r in rules.rules] == ["agents-read", "card-changes-need-a-dba"]
