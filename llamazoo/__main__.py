from llamazoo.cli import entry

entry()
