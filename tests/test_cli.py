import asyncio
import asyncio.subprocess as aproc
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.errors import ConfigError
from tests.auxil.process import ROOT, chinwag


@pytest.mark.parametrize(("env", "named"), [
    ({"CHINWAG_GENERATOR": "gpt9"}, "CHINWAG_GENERATOR"),
    ({"CHINWAG_MODEL": "/no/such/model"}, "CHINWAG_MODEL"),
    ({"CHINWAG_DATABASE_URL": "not a url"}, "CHINWAG_DATABASE_URL"),
    ({"CHINWAG_ADMINS": "telegram"}, "CHINWAG_ADMINS"),
    ({"CHINWAG_CONTEXT_TOKENS": "lots"}, "CHINWAG_CONTEXT_TOKENS"),
])
def test_bad_setting_stops_with_one_clear_line(env: dict[str, str], named: str,
                                               tmp_path: Path) -> None:
    result = chinwag("console", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_settings_come_from_dotenv_and_tokens_stay_secret(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("CHINWAG_TELEGRAM_TOKEN=123:secret-token\n"
                                   "CHINWAG_ADMINS=telegram:1,discord:2\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.admins == ("telegram:1", "discord:2")
    assert settings.telegram_token is not None
    assert settings.telegram_token.get_secret_value() == "123:secret-token"
    assert "secret-token" not in repr(settings) and "secret-token" not in str(settings)


def test_bad_token_value_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(telegram_token=["not", "a", "string"])
    assert "not" not in str(raised.value).split(":", 1)[1]


def test_help_lists_the_commands() -> None:
    result = chinwag("--help", timeout=60)
    assert result.returncode == 0
    for word in ("console", "run", "db"):
        assert word in result.stdout


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    result = chinwag("db", "upgrade", env={"CHINWAG_DATA_DIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 0, result.stderr
    tables = {row[0] for row in sqlite3.connect(tmp_path / "chinwag.db").execute(
        "select name from sqlite_master where type='table'")}
    assert {"conversations", "messages", "users", "usage", "alembic_version"} <= tables


def test_db_downgrade_goes_back_for_an_older_release(tmp_path: Path) -> None:
    env = {"CHINWAG_DATA_DIR": str(tmp_path)}
    assert chinwag("db", "upgrade", env=env, timeout=60).returncode == 0
    result = chinwag("db", "downgrade", "0003", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "database is at revision 0003"
    columns = {row[1] for row in sqlite3.connect(tmp_path / "chinwag.db").execute(
        "pragma table_info(messages)")}
    assert "state" in columns and not columns & {"reply_draft_id", "reply_draft_ids"}
    wrong = chinwag("db", "downgrade", "no-such-revision", env=env, timeout=60)
    assert wrong.returncode == 1 and "no-such-revision" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_console_with_piped_input_exits_cleanly_and_remembers(tmp_path: Path) -> None:
    env = {"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_GENERATOR": "echo"}
    first = chinwag("console", stdin="hello there\n/settings\n", env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "hello there"
    assert "temperature = 0.7 (default)" in first.stdout
    again = chinwag("console", stdin="/stats\n", env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "Messages: 1 from users, 1 replies" in again.stdout


def test_run_without_tokens_falls_back_to_the_console(tmp_path: Path) -> None:
    env = {"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_GENERATOR": "echo"}
    result = chinwag("run", stdin="ping\n", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ping"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_falling_back_to_the_console_stops_cleanly_on_a_signal(
        sig: signal.Signals, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update({"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_GENERATOR": "echo",
                "PYTHONPATH": str(ROOT)})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", env=env, cwd=tmp_path, stdin=aproc.PIPE,
        stdout=aproc.PIPE, stderr=aproc.PIPE)
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"ping\n")  # the input stays open: the console waits for more
        await process.stdin.drain()
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ping\n"
        process.send_signal(sig)
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert "Traceback" not in err.decode() and "CancelledError" not in err.decode()


def test_paths_expand_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / ".env").write_text("CHINWAG_MODEL_CACHE_DIR=~/.cache/chinwag\n"
                                   "CHINWAG_DATA_DIR=~/chinwag-data\n")
    settings = load_settings()  # the working folder is tmp_path, where .env is
    assert settings.model_cache_dir == home / ".cache" / "chinwag"
    assert settings.data_dir == home / "chinwag-data"
    assert settings.database_url == f"sqlite+aiosqlite:///{home / 'chinwag-data' / 'chinwag.db'}"
    given = load_settings(database_url="sqlite+aiosqlite:///~/elsewhere/bot.db")
    assert given.database_url == f"sqlite+aiosqlite:///{home / 'elsewhere' / 'bot.db'}"


def test_db_upgrade_with_a_home_path_makes_no_tilde_folder(tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text("CHINWAG_DATA_DIR=~/chinwag-data\n")
    result = chinwag("db", "upgrade", env={"HOME": str(home)}, cwd=work, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (home / "chinwag-data" / "chinwag.db").is_file()
    assert not (work / "~").exists()


@pytest.mark.model
def test_model_prepare_leaves_the_first_start_nothing_to_convert(tmp_path: Path) -> None:
    # The conversion cache is the one the model tests share (~/.cache/chinwag).
    first = chinwag("model", "prepare", timeout=300)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip().rsplit(": ", 1)[1])
    assert (folder / ".chinwag-complete").is_file() and (folder / "model.safetensors").is_file()
    again = chinwag("console", stdin="hello\n", timeout=300,
                    env={"CHINWAG_MAX_REPLY_TOKENS": "16", "CHINWAG_DATA_DIR": str(tmp_path)})
    assert again.returncode == 0, again.stderr
    assert "converting" not in again.stderr and again.stdout.strip()


def test_model_prepare_has_nothing_to_do_for_a_remote_or_echo_model() -> None:
    result = chinwag("model", "prepare", env={"CHINWAG_GENERATOR": "echo"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "nothing to prepare: no transformers model is configured"
