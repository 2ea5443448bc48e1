"""The alpaca-py adapter: the only place in the product that imports the SDK.

Run the services as modules (`python -m services.dispatcher`): this package shares its name with
the SDK's top-level `alpaca` package, and running a file from this folder would shadow the SDK.
"""
