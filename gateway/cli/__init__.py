"""The gateway's commands: argparse and printing; the actions themselves are in gateway.ops."""
