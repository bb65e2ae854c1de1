"""The coordinator's register of site names: kept whole on disk, one name per node, read afresh."""

import pytest

from common.site_registry import SiteRegistry, site_name_of_key


def test_names_are_added_removed_and_read_by_another_process_reading_the_same_file(tmp_path):
    path = tmp_path / "state" / "sites.json"
    SiteRegistry(path).add(11, "site-a")
    SiteRegistry(path).add(22, "site-b")
    registry = SiteRegistry(path)
    assert registry.names() == {11: "site-a", 22: "site-b"}
    assert registry.node_of("site-b") == 22 and registry.node_of("site-c") is None
    registry.remove(11)
    assert SiteRegistry(path).names() == {22: "site-b"}
    assert [p.name for p in path.parent.iterdir()] == ["sites.json"]  # no temporary file left


def test_a_name_already_registered_is_refused_before_anything_is_registered(tmp_path):
    registry = SiteRegistry(tmp_path / "sites.json")
    registry.add(11, "site-a")
    with pytest.raises(ValueError, match=r"'site-a' is already registered as node 11: unregister it first"):
        registry.check_free("site-a")
    registry.check_free("site-b")


def test_a_damaged_register_is_refused_with_the_fix(tmp_path):
    (tmp_path / "sites.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="is not a site register .* register the sites again"):
        SiteRegistry(tmp_path / "sites.json").names()


def test_a_key_names_its_site_by_the_comment_fedistill_certs_wrote_else_by_its_file(tmp_path):
    (tmp_path / "a.pub").write_text("ecdsa-sha2-nistp384 AAAA fedistill-site-hospital-a\n")
    (tmp_path / "bank-b.pub").write_text("ecdsa-sha2-nistp384 AAAA someone@laptop\n")
    assert site_name_of_key(tmp_path / "a.pub") == "hospital-a"
    assert site_name_of_key(tmp_path / "bank-b.pub") == "bank-b"
