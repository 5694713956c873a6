"""modelpress command line: parses arguments, renders reports, maps errors to exit codes."""
