from reclip_ray.cli import main

raise SystemExit(main())
