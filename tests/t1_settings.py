"""Settings precedence (issue 13): flag > environment > config file > default, through
`ivdfs.settings` (the parser it builds, `resolve`, `check_file_keys`) and a real config file
read by `ivdfs.config.load_config_file`. Lists add up from the file and the flags;
IVDFS_PASSWORD shadows the file's password_file; a TLS flag replaces all of the file's TLS
settings; a bad file, flag or value is exit 3 in one line (also through `ivdfs.cli.main`).
No vCenter, no mount: runs under `pytest -m "not mount"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import MISSING
from pathlib import Path

import pytest

from ivdfs import cli, settings
from ivdfs.config import (
    Limits,
    MountConfig,
    Secret,
    ServerConfig,
    TreeSettings,
    VolumeSettings,
    load_config_file,
)
from ivdfs.errors import ExitCode, UserError, exit_code_of
from ivdfs.settings import Values

MiB = 1 << 20


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """None of the caller's IVDFS_* variables, and no config file at the default location."""
    for name in [n for n in os.environ if n.startswith("IVDFS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config-here"))


def resolve(tmp_path: Path, argv: Sequence[str] = (), config: str | None = None,
            command: str = "mount") -> Values:  # fmt: skip
    """What `command` gets from these flags, the environment and (if given) this file."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    settings.add_arguments(parser, command)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse's own refusal of a flag
        raise AssertionError(f"argparse refused {argv}") from e
    source, values = None, {}
    if config is not None:
        path = tmp_path / "ivdfs" / "config.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(config)
        source, values = load_config_file(path, settings.PATH_KEYS)
        assert source is not None
        settings.check_file_keys(values, source)
    return settings.resolve(command, args, values, source)


FILE = """
server = "file.example:1001"
user = "file-user"
cache_size = "64M"
refresh = 5
options = ["noatime"]
snapshot_now = "alpha"
"""


def test_each_layer_beats_the_ones_below(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = ["--server", "flag.example:1003", "--cache-size", "32M"]
    assert resolve(tmp_path, flag, FILE).server == "flag.example:1003"
    monkeypatch.setenv("IVDFS_SERVER", "env.example:1002")
    both = resolve(tmp_path, flag, FILE)
    assert both.server == "flag.example:1003"  # flag > environment
    assert both.cache_size == 32 * MiB  # flag > file
    v = resolve(tmp_path, [], FILE)
    assert v.server == "env.example:1002"  # environment > file
    assert v.user == "file-user" and v.cache_size == 64 * MiB and v.refresh == 5.0  # file
    assert v.block_size == MiB and v.prefetch == 16 and v.volumes == "none"  # defaults
    assert v.insecure is False and v.use_async is True
    monkeypatch.delenv("IVDFS_SERVER")
    assert resolve(tmp_path, [], FILE).server == "file.example:1001"
    # No file, no environment, no flag: the table's defaults.
    bare = resolve(tmp_path)
    assert bare.server is None and bare.cache_size == 256 * MiB and bare.refresh == 60.0
    assert bare.options == () and bare.snapshot_now == ()
    # An empty variable is no setting at all (as unset), not an empty value.
    monkeypatch.setenv("IVDFS_USER", "")
    assert resolve(tmp_path, [], FILE).user == "file-user"


def test_lists_add_up_from_the_file_and_the_flags(tmp_path: Path) -> None:
    v = resolve(tmp_path, ["-o", "allow_other", "--snapshot-now", "beta", "-o", "uid=7"], FILE)
    assert v.options == ("noatime", "allow_other", "uid=7")
    assert v.snapshot_now == ("alpha", "beta")
    assert resolve(tmp_path, [], FILE).options == ("noatime",)
    assert resolve(tmp_path, ["-o", "ro"]).options == ("ro",)
    listed = resolve(tmp_path, [], 'snapshot_now = ["a", "b"]\n')
    assert listed.snapshot_now == ("a", "b")


def test_ivdfs_password_shadows_the_files_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = 'password_file = "secret/pw"\n'
    # Relative to the file; the file's password_file stands while nothing replaces it.
    from_file = resolve(tmp_path, [], conf, command="ls").password_file
    assert from_file == tmp_path / "ivdfs" / "secret" / "pw"
    monkeypatch.setenv("IVDFS_PASSWORD", "from-the-environment")
    assert resolve(tmp_path, [], conf, command="ls").password_file is None
    # A flag still beats the variable (a flag beats everything).
    flagged = resolve(tmp_path, ["--password-file", "/etc/pw"], conf, command="ls")
    assert flagged.password_file == Path("/etc/pw")


def test_a_tls_flag_replaces_all_of_the_files_tls_settings(tmp_path: Path) -> None:
    conf = 'ca_file = "/etc/ca.pem"\nthumbprint = "' + "AB:" * 19 + 'AB"\n'
    from_file = resolve(tmp_path, [], conf, command="ls")
    assert from_file.ca_file == Path("/etc/ca.pem") and from_file.thumbprint
    insecure = resolve(tmp_path, ["--insecure"], conf, command="ls")
    assert insecure.insecure is True and insecure.ca_file is None and insecure.thumbprint is None
    ca = resolve(tmp_path, ["--ca-file", "/other.pem"], conf, command="ls")
    assert ca.ca_file == Path("/other.pem") and ca.thumbprint is None


BAD_FILES = [
    # file text, fragment of the one line
    ('sever = "typo"\n', "unknown setting 'sever'"),
    ("foreground = true\n", "unknown setting 'foreground'"),  # a flag that is not a setting
    ("insecure = 1\n", "invalid insecure 1: use true or false"),
    ('insecure = "yes"\n', "invalid insecure 'yes': use true or false"),
    ("cache_size = true\n", "invalid cache_size True"),
    ('cache_size = "lots"\n', "invalid cache_size 'lots'"),
    ('refresh = "soon"\n', "invalid refresh 'soon'"),
    ("prefetch = 1000\n", "must be at most 256"),
    ("options = 3\n", "use a string or a list of strings"),
    ("options = [1, 2]\n", "use a string or a list of strings"),
    ('server = ["a"]\n', "invalid server ['a']"),
    ('volumes = "zfs"\n', "volumes: choose one of none, kernel, fuse, guestfs, vixmntapi"),
    ('password = "x"\n', "'password' is not accepted here"),
    ("[server]\nhost = 'x'\n", "tables are not supported"),
    ("server = \n", "config file"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_FILES, ids=[f for _, f in BAD_FILES])
def test_a_bad_config_file_is_exit_3_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    with pytest.raises(UserError) as e:
        resolve(tmp_path, [], text)
    assert exit_code_of(e.value) == ExitCode.CONFIG
    assert fragment in str(e.value) and "\n" not in str(e.value)
    # The same through the command line, as a user meets it (it fails before any connection).
    conf = tmp_path / "ivdfs" / "config.toml"
    assert cli.main(["mount", "--config", str(conf), str(tmp_path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ivdfs: config file ") and fragment in err


BAD_FLAGS = [
    (["--cache-size", "lots"], "invalid --cache-size 'lots'"),
    (["--cache-size", "100000T"], "more than half of this machine's memory"),
    (["--cache-size", "1" + "0" * 23], "more than half of this machine's memory"),
    (["--block-size", "384K"], "power of two"),
    (["--max-connections", "0"], "must be at least 1"),
    (["--idle-timeout", "-1"], "invalid --idle-timeout"),
    (["--transport", "nbd:pigeon"], "invalid --transport"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_FLAGS, ids=[a[0] for a, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_exit_3_in_one_line(
    tmp_path: Path, argv: list[str], fragment: str
) -> None:
    with pytest.raises(UserError) as e:
        resolve(tmp_path, argv)
    assert exit_code_of(e.value) == ExitCode.CONFIG
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_abbreviations_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`--insec` would pass as --insecure and slip past the config file's TLS override."""
    with pytest.raises(SystemExit) as e:
        cli.main(["ls", "--insec"])
    assert e.value.code == ExitCode.USAGE
    assert "unrecognized arguments: --insec" in capsys.readouterr().err


def test_a_config_file_that_is_not_utf8_is_exit_3_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "config.toml"
    conf.write_bytes(b'server = "vc\xff.example"\n')
    assert cli.main(["mount", "--config", str(conf), str(tmp_path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert err == f"ivdfs: config file {conf} is not UTF-8 text (byte 12)\n"


@pytest.mark.parametrize(
    "argv",
    [["--volumes", "sideways"], ["--cache-size", "-1K"], ["--no-such-flag"]],
    ids=["bad-choice", "negative-size", "unknown-flag"],
)
def test_argparse_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["mount", *argv, str(tmp_path)])
    assert e.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ivdfs") and "usage:" not in err


def test_every_default_is_written_once_in_the_table(tmp_path: Path) -> None:
    """MountConfig has no default of its own; the views the layers take (and the help
    texts) get theirs from the table, so a default changed there changes everywhere."""
    d = settings.default
    fields = dataclasses.fields(MountConfig)
    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields)
    names = {s.name for s in settings.settings_of("mount")}
    assert {f.name for f in fields} - {"server", "mountpoint"} <= names
    cfg = MountConfig.of(
        {**settings.defaults("mount"), "vddk_libdir": tmp_path},
        ServerConfig("vc.example", 443, "u", Secret("pw")),
        tmp_path,
    )
    assert cfg.limits == Limits() and cfg.tree == TreeSettings()
    assert cfg.volume_settings == VolumeSettings()
    assert (Limits().max_connections, Limits().in_flight_bytes, Limits().handles_per_disk) == (
        d("max_connections"), d("max_in_flight"), d("vddk_handles"),
    )  # fmt: skip
    assert (TreeSettings().inventory_threads, TreeSettings().refresh) == (
        d("vcenter_connections"), d("refresh"),
    )  # fmt: skip
    assert ServerConfig("vc.example", 443, "u", Secret("pw")).timeout == d("vcenter_timeout")

    def help_of(name: str) -> str:
        return settings.help_text(settings.BY_NAME[name])

    assert help_of("cache_size").endswith("(default 256M; at most half of the RAM)")
    assert help_of("idle_timeout").endswith("(default 60)")
    mount_help = subprocess.run([sys.executable, "-m", "ivdfs", "mount", "--help"],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "(default 2G)" in " ".join(mount_help.split())  # --guestfs-memory, as rendered
    for s in settings.SETTINGS:
        if s.kind == "value" and s.default is not None and s.show_default:
            assert "(default" not in s.help, f"{s.name}: the table renders its default"
