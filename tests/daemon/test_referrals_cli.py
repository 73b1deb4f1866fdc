"""The `referrals:` configuration section and the `corespond referrals` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corespond.daemon.cli import main
from corespond.daemon.config import ConfigError, load_config
from tests.adapters.tlsfiles import make_pki

REFERRALS = """\
referrals:
  sending_application: CORESPOND
  sending_facility: COUNTY-BH
  providers:
    csu:
      host: 127.0.0.1
      port: 2575
      receiving_application: BHRECV
      receiving_facility: CSU
      service_types: [crisis-stabilization]
      backoff: {initial: 1, max: 30, max_attempts: 5}
"""


def config_file(tmp_path: Path, referrals: str = REFERRALS) -> Path:
    path = tmp_path / "corespond.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\n" + referrals)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_values(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    text = REFERRALS + (
        "      tls:\n"
        "        server_name: csu.example.test\n"
        f"        ca_file: {pki.ca_cert}\n"
        f"        cert_file: {pki.client_cert}\n"
        f"        key_file: {pki.client_key}\n"
        "    mcrt: {host: mcrt.example.test, port: 6661, receiving_application: A,\n"
        "           receiving_facility: B, profile: mdm-t02, ack_timeout: 12.5}\n"
        "  listen: {host: 127.0.0.1, port: 2576}\n"
    )
    cfg = load_config(config_file(tmp_path, text)).referrals
    assert cfg is not None
    csu, mcrt = cfg.providers
    assert (csu.profile, csu.service_types, csu.backoff_initial, csu.max_attempts) == (
        "ref-i12",
        ("crisis-stabilization",),
        1.0,
        5,
    )
    assert csu.tls is not None and csu.tls.server_name == "csu.example.test"
    assert csu.tls.cert_file == pki.client_cert
    assert (mcrt.profile, mcrt.ack_timeout, mcrt.tls) == ("mdm-t02", 12.5, None)
    assert cfg.listen is not None and cfg.listen.port == 2576
    assert (cfg.build_processes, cfg.claim_ahead) == (1, 8)  # the defaults


def test_config_builders_and_claims_ahead(tmp_path: Path) -> None:
    text = REFERRALS.replace("  providers:", "  build_processes: 2\n  claim_ahead: 1\n  providers:")
    cfg = load_config(config_file(tmp_path, text)).referrals
    assert cfg is not None and (cfg.build_processes, cfg.claim_ahead) == (2, 1)
    with pytest.raises(ConfigError) as caught:
        load_config(config_file(tmp_path, text.replace("claim_ahead: 1", "claim_ahead: 0")))
    assert "at 'referrals.claim_ahead'" in "\n".join(str(p) for p in caught.value.problems)


def test_config_errors_name_file_line_and_key(tmp_path: Path) -> None:
    text = (
        "referrals:\n"
        "  sending_application: CORE|SPOND\n"
        "  sending_facility: X\n"
        "  providers:\n"
        "    csu:\n"
        "      host: 127.0.0.1\n"
        "      port: 70000\n"
        "      receiving_application: A\n"
        "      receiving_facility: B\n"
        "      profile: oru\n"
        "      tls: {ca_file: /nonexistent/ca.pem, cert_file: /nonexistent/c.pem}\n"
        "      backoff: {initial: 100, max: 10}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file(tmp_path, text))
    problems = [str(p) for p in caught.value.problems]
    joined = "\n".join(problems)
    assert "corespond.yaml:3: at 'referrals.sending_application'" in joined
    assert "corespond.yaml:8: at 'referrals.providers.csu.port'" in joined
    assert "corespond.yaml:11: at 'referrals.providers.csu.profile'" in joined
    # The schema errors keep the section from parsing; once they are fixed, the rest shows.
    fixed = (
        text.replace("CORE|SPOND", "CORESPOND")
        .replace("70000", "7000")
        .replace("profile: oru", "profile: adt-a04")
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file(tmp_path, fixed))
    joined = "\n".join(str(p) for p in caught.value.problems)
    assert "at 'referrals.providers.csu.tls': cert_file and key_file go together" in joined
    missing = "at 'referrals.providers.csu.tls.ca_file': file /nonexistent/ca.pem does not exist"
    assert missing in joined
    assert "at 'referrals.providers.csu.backoff.initial': is longer than backoff.max" in joined


def test_cli_create_list_show_cancel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(config_file(tmp_path))
    assert run(capsys, "db", "upgrade", "-c", config)[0] == 0
    summary = tmp_path / "summary.txt"
    summary.write_text("ZQXNARRATIVE needs a bed tonight\n")
    code, out, err = run(
        capsys,
        "referrals",
        "create",
        "INC-9",
        "--provider",
        "csu",
        "--service",
        "crisis-stabilization",
        "--urgency",
        "stat",
        "--clinician",
        "CLIN-1",
        "--summary-file",
        str(summary),
        "--json",
        "-c",
        config,
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["state"] == "queued" and len(created["control_id"]) == 20
    assert "not in the store" in err

    code, out, _ = run(capsys, "referrals", "list", "--json", "-c", config)
    [row] = [json.loads(line) for line in out.splitlines()]
    assert (row["ref"], row["message_state"], row["attempts"]) == (created["ref"], "pending", 0)
    code, out, _ = run(capsys, "referrals", "list", "-c", config)
    assert created["ref"] in out and "ZQXNARRATIVE" not in out

    code, out, _ = run(capsys, "referrals", "show", created["ref"], "--json", "-c", config)
    assert code == 0 and "ZQXNARRATIVE" not in out
    code, out, _ = run(capsys, "referrals", "show", created["ref"], "--phi", "--json", "-c", config)
    assert "ZQXNARRATIVE" in json.loads(out)["summary"]

    code, _, err = run(capsys, "referrals", "retry", created["ref"], "-c", config)
    assert code == 1 and "only held referrals are retried" in err
    assert run(capsys, "referrals", "cancel", created["ref"], "-c", config)[0] == 0
    code, _, err = run(capsys, "referrals", "cancel", created["ref"], "-c", config)
    assert code == 1 and "already cancelled" in err


def test_cli_part2_consent_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(config_file(tmp_path))
    run(capsys, "db", "upgrade", "-c", config)
    create = (
        "referrals",
        "create",
        "INC-9",
        "--provider",
        "csu",
        "--service",
        "crisis-stabilization",
        "--clinician",
        "CLIN-1",
        "--part2",
        "--json",
        "-c",
        config,
    )
    code, out, _ = run(capsys, *create)
    held = json.loads(out)
    assert held["state"] == "held" and "part2-no-consent" in held["hold_reason"]
    code, _, err = run(capsys, "referrals", "retry", held["ref"], "-c", config)
    assert code == 1 and "held for consent" in err
    code, out, _ = run(capsys, "referrals", "consent", "C-77", "--provider", "csu", "-c", config)
    assert code == 0 and "recorded" in out
    code, out, err = run(
        capsys, "referrals", "retry", held["ref"], "--consent", "C-77", "--json", "-c", config
    )
    assert code == 0, err
    assert json.loads(out)["state"] == "queued"
    code, _, err = run(
        capsys,
        "referrals",
        "create",
        "INC-9",
        "--provider",
        "elsewhere",
        "--service",
        "x",
        "--clinician",
        "C",
        "-c",
        config,
    )
    assert code == 1 and "unknown provider elsewhere" in err


def test_cli_without_the_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(config_file(tmp_path, ""))
    code, _, err = run(capsys, "referrals", "list", "-c", config)
    assert code == 1 and "referrals are not configured" in err


def test_cli_takes_the_person_and_zone_from_the_incident(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import select

    from corespond.adapters.hl7_referral import parse_reply
    from corespond.daemon.store.engine import create_store_engine
    from corespond.daemon.store.tables import referral_messages
    from corespond.daemon.store.writer import write_batch
    from tests.daemon.store.records import record, snapshot

    regional = REFERRALS + "      regions: [Z9]\n"
    config = str(config_file(tmp_path, regional))
    run(capsys, "db", "upgrade", "-c", config)
    engine = create_store_engine(f"sqlite:///{tmp_path / 'state' / 'corespond.db'}")
    try:
        with engine.begin() as conn:
            write_batch(conn, [record(snapshot("CAD-5", person="Ada Q Testperson"))])
        code, out, err = run(
            capsys,
            "referrals",
            "create",
            "NCAD-5",
            "--provider",
            "csu",
            "--service",
            "crisis-stabilization",
            "--clinician",
            "CLIN-1",
            "--json",
            "-c",
            config,
        )
        assert code == 0, err
        assert "not in the store" not in err
        with engine.connect() as conn:
            message = conn.execute(select(referral_messages.c.message)).scalar_one()
    finally:
        engine.dispose()
    pid = next(s for s in message.split(b"\r") if s.startswith(b"PID"))
    fields = pid.split(b"|")
    assert fields[5] == b"Testperson^Ada Q" and fields[7] == b"19900101"
    assert fields[11] == b"12 Imaginary Lane" and fields[13] == b"555-0100^PRN^PH"
    assert parse_reply(message).originating_referral_id == json.loads(out)["ref"]
    # The incident's zone is its region: a provider for other regions refuses it.
    other = str(config_file(tmp_path, REFERRALS + "      regions: [north]\n"))
    code, _, err = run(
        capsys,
        "referrals",
        "create",
        "NCAD-5",
        "--provider",
        "csu",
        "--service",
        "crisis-stabilization",
        "--clinician",
        "CLIN-1",
        "-c",
        other,
    )
    assert code == 1 and "does not take region Z9" in err
