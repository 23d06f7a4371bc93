from cloudbot_cli.app import main

raise SystemExit(main())
