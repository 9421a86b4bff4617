"""ray_auth: where the token comes from, the one-line refusals, and the local Ray's own token
(issue 29). Refusals by a real cluster (`ray start --head` with token authentication) are in
tests/test_multinode.py, which has one running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ray_auth
from cascade.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No RAY_AUTH_* variable, and a home of the test's without a token."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_the_token_source_follows_rays_precedence(clean_env, monkeypatch):
    home_token = clean_env / ".ray" / "auth_token"
    assert ray_auth.token_source() == (str(home_token), False)
    home_token.parent.mkdir()
    home_token.write_text("from-home\n")
    assert ray_auth.token_source() == (str(home_token), True)
    named = clean_env / "named"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert ray_auth.token_source() == (str(named), False)  # named but unreadable: no fallback
    named.write_text("from-path")
    assert ray_auth.token_source() == (str(named), True)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_auth.token_source() == ("RAY_AUTH_TOKEN", True)


def test_each_refusal_says_what_was_sent_and_the_fix(clean_env, monkeypatch):
    fix = ray_auth.TOKEN_FIX
    assert ray_auth.refusal("h:1") == ("Ray at RAY_ADDRESS=h:1 requires a token (token "
                                       "authentication) and this driver sent none "
                                       f"(RAY_AUTH_MODE=unset): export RAY_AUTH_MODE=token, with {fix}")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "sent none (RAY_AUTH_MODE=disabled)" in ray_auth.refusal("h:1")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token = clean_env / ".ray" / "auth_token"
    assert ray_auth.refusal("h:1") == f"RAY_AUTH_MODE=token but there is no token in {token}: put {fix}"
    # Token mode without a token is refused here: Ray's C++ loader would abort the process.
    with pytest.raises(UserError, match="^RAY_AUTH_MODE=token but there is no token in"):
        ray_auth.check_token("127.0.0.1:1")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    assert ray_auth.refusal("h:1") == ("Ray at RAY_ADDRESS=h:1 refused the token in RAY_AUTH_TOKEN: "
                                       "it is not the token the cluster was started with; put "
                                       f"{fix}")
    assert "\n" not in ray_auth.refusal("h:1")


def test_the_local_ray_gets_a_token_of_its_own_unless_told_otherwise(clean_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_auth.local_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-clusters")  # a cluster's token is not the local one's
    ray_auth.local_token_auth()
    assert os.environ["RAY_AUTH_TOKEN"] == ray_auth._LOCAL_TOKEN != "the-clusters"
    assert len(ray_auth._LOCAL_TOKEN) == 64


LOCAL_RAY = textwrap.dedent("""
    import os, subprocess, sys
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    import sweep

    sweep.start_local_ray(num_cpus=1, log_to_driver=False)
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    address = ray.get_runtime_context().gcs_address
    # Another process without the token (RAY_AUTH_MODE unset) is refused by this local Ray.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    probe = subprocess.run([sys.executable, "-c", "import ray_auth, sys; "
                            "ray_auth.check_token(sys.argv[1])", address],
                           env=env, capture_output=True, text=True, timeout=120)
    ray.shutdown()
    print(probe.returncode, probe.stderr.strip().splitlines()[-1])
""")


@pytest.mark.slow
def test_a_local_ray_has_token_authentication_and_writes_no_token(clean_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", LOCAL_RAY], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    status, last = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "1", done.stdout
    assert last.startswith("cascade.errors.UserError: Ray at RAY_ADDRESS=") and \
        "requires a token (token authentication) and this driver sent none" in last, last
    assert not (clean_env / ".ray").exists()  # Ray's default would have written ~/.ray/auth_token
    assert "Token authentication is enabled for this Ray cluster" not in done.stderr
