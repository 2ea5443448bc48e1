"""Option-contract choice and validation (`options.py`): pure, part of the domain layer.

The package keeps the seed's path; the alpaca-py SDK itself is used only in
`services/adapters/alpaca/`. Run the services as modules (`python -m services.dispatcher`): this
package shares its name with the SDK's top-level `alpaca` package, and running a file from this
folder would shadow the SDK.
"""
