from rredcot.cli import main

main()
