"""Project-wide plumbing below every stage: command-line conventions (cli), atomic files and hashes (io), YAML configs
with pydantic schemas and ``key=value`` overrides (config), and the ``.env`` file (envfile). No torch, no BDD100K."""
