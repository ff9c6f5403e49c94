"""The deploykit_cli_commands hook: plugins add subcommands to ``deploykit`` without the CLI importing them."""
from __future__ import annotations

import deploykit
from deploykit.cli.main import main
from deploykit.errors import ConfigError


class Hello:
    name = "hello"

    def register(self, sub):
        p = sub.add_parser(self.name, help="say hello")
        p.add_argument("--to", default="world")
        return p

    def run(self, args) -> int:
        if args.to == "nobody":
            raise ConfigError("--to nobody: there is nobody to greet", hint="pass --to NAME")
        print(f"hello {args.to}")
        return 0


class Clash(Hello):
    name = "convert"  # a built-in command's name


class Greeter:
    @deploykit.hookimpl
    def deploykit_cli_commands(self):
        return [Hello(), Clash()]


class Broken:
    @deploykit.hookimpl
    def deploykit_cli_commands(self):
        raise RuntimeError("no commands today")


def test_hook_deploykit_cli_commands(fresh_plugins, capsys):
    reg = fresh_plugins.registry()
    reg.register(Greeter(), "greeter")
    reg.register(Broken(), "broken")
    assert main(["hello", "--to", "plugins"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello plugins\n"
    assert "plugin 'greeter': command 'convert' skipped" in captured.err  # a built-in keeps its name
    assert "plugin 'broken': deploykit_cli_commands failed (RuntimeError: no commands today)" in captured.err
    # A DeploykitError from a plugin's command is reported like a built-in's: one line, HINT, its exit code.
    assert main(["hello", "--to", "nobody"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "error: --to nobody: there is nobody to greet" in err and "HINT: pass --to NAME" in err


def test_builtin_plugins_contribute_import_gguf(capsys):
    import pytest

    pytest.importorskip("gguf")
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "import-gguf" in capsys.readouterr().out
