from canaryflow.sandbox.server import main

main()
