from reclip_ray.cli import run

run()
