from auditor.cli import main

# The name the usage lines and shell completion (_AUDITOR_COMPLETE) use, as the console script's.
main(prog_name="auditor")
