from compstore.cli import main

main()
