from leader_edge.cli import main

main()
