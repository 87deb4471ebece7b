from .dataset import main

main()
