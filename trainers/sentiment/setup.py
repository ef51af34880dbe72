"""Packaging for the StarChart sentiment trainer (Vertex AI / CMLE layout).

Build with ``python setup.py sdist``; run the extracted sdist with
``python -m trainer.task``.  TensorFlow is assumed to be present in the
training image, so there are no install_requires.
"""
from setuptools import find_packages, setup

setup(
    name='sentiment_trainer',
    version='0.1',
    packages=find_packages(),
    include_package_data=True,
    package_data={'trainer': ['data/*']},
    description='StarChart sentiment classifier trainer (TensorFlow/Keras).',
)
