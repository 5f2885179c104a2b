"""`quantrol demo`: the 30-second stack check (`quick`), the whole story on the local stack (`story`) and on a real
cluster (`cluster`); `command` registers the subcommand with the product CLI."""
