from md_server.server import main

main()
