from mlxmerge.cli import main

main()
