"""Model configs shipped with road-export (installed as the package data `road_export.models`, read with
importlib.resources by road_export.export.zoo): small architectures whose weights come from a fixed seed."""
