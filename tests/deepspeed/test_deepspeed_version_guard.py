"""The DeepSpeed releases the EP hand-over accepts are stated in one place and checked when a model is handed over."""

import os
import unittest
from unittest import mock

from transformers.integrations import deepspeed_expert_parallel as ep


class DeepSpeedVersionGuardTest(unittest.TestCase):
    def check_with(self, version, **env):
        with mock.patch.object(ep.importlib.metadata, "version", return_value=version), \
                mock.patch.dict(os.environ, env):
            ep.check_deepspeed_version_is_tested()

    def test_the_tested_release_is_accepted(self):
        self.check_with("0.19.8")

    def test_a_release_outside_the_range_is_refused_with_what_to_do(self):
        for version in ("0.18.9", "0.20.0"):
            with self.assertRaisesRegex(ImportError, rf"deepspeed {version} is installed.*pip install "
                                                     rf"'deepspeed{ep.TESTED_DEEPSPEED_VERSIONS}'"):
                self.check_with(version)

    def test_the_override_lets_an_untested_release_through_with_a_warning(self):
        with self.assertLogs("transformers.integrations.deepspeed_expert_parallel", "WARNING") as logs:
            self.check_with("0.20.0", **{ep.ALLOW_UNTESTED_DEEPSPEED_ENV: "1"})
        self.assertIn("not 0.20.0", logs.output[0])

    def test_the_installed_deepspeed_is_in_the_range_ci_pins(self):
        self.check_with(ep.importlib.metadata.version("deepspeed"))
