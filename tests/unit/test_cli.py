import pytest

from chatterbox_serverless.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "usage: chatterbox-serverless" in capsys.readouterr().out
