from fpm.cli import main

main()
