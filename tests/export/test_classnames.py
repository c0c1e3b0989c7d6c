"""learners/classnames.py against every Stanford Cars name whatcar uses, fields written out by
hand: the 164 known classes and the 16 unknown ones; and export/classnames.py, which writes them
into a version's manifest. The table is the expected answer, so the test needs no data folder."""

import json
import os

import pytest

from export import classnames
from learners.classnames import ClassNameError, class_fields, display_names, parse

# (Stanford name, make, model, body, year)
KNOWN = [
    ('AM General Hummer SUV 2000', 'AM General', 'Hummer', 'SUV', 2000),
    ('Acura Integra Type R 2001', 'Acura', 'Integra Type R', None, 2001),
    ('Acura RL Sedan 2012', 'Acura', 'RL', 'Sedan', 2012),
    ('Acura TL Sedan 2012', 'Acura', 'TL', 'Sedan', 2012),
    ('Acura TL Type-S 2008', 'Acura', 'TL Type-S', None, 2008),
    ('Acura TSX Sedan 2012', 'Acura', 'TSX', 'Sedan', 2012),
    ('Aston Martin V8 Vantage Convertible 2012', 'Aston Martin', 'V8 Vantage', 'Convertible', 2012),
    ('Aston Martin V8 Vantage Coupe 2012', 'Aston Martin', 'V8 Vantage', 'Coupe', 2012),
    ('Aston Martin Virage Convertible 2012', 'Aston Martin', 'Virage', 'Convertible', 2012),
    ('Audi 100 Wagon 1994', 'Audi', '100', 'Wagon', 1994),
    ('Audi A5 Coupe 2012', 'Audi', 'A5', 'Coupe', 2012),
    ('Audi R8 Coupe 2012', 'Audi', 'R8', 'Coupe', 2012),
    ('Audi RS 4 Convertible 2008', 'Audi', 'RS 4', 'Convertible', 2008),
    ('Audi S4 Sedan 2007', 'Audi', 'S4', 'Sedan', 2007),
    ('Audi S4 Sedan 2012', 'Audi', 'S4', 'Sedan', 2012),
    ('Audi S5 Convertible 2012', 'Audi', 'S5', 'Convertible', 2012),
    ('Audi S6 Sedan 2011', 'Audi', 'S6', 'Sedan', 2011),
    ('Audi TT Hatchback 2011', 'Audi', 'TT', 'Hatchback', 2011),
    ('Audi TT RS Coupe 2012', 'Audi', 'TT RS', 'Coupe', 2012),
    ('Audi TTS Coupe 2012', 'Audi', 'TTS', 'Coupe', 2012),
    ('Audi V8 Sedan 1994', 'Audi', 'V8', 'Sedan', 1994),
    ('BMW 1 Series Convertible 2012', 'BMW', '1 Series', 'Convertible', 2012),
    ('BMW 1 Series Coupe 2012', 'BMW', '1 Series', 'Coupe', 2012),
    ('BMW 3 Series Sedan 2012', 'BMW', '3 Series', 'Sedan', 2012),
    ('BMW 3 Series Wagon 2012', 'BMW', '3 Series', 'Wagon', 2012),
    ('BMW 6 Series Convertible 2007', 'BMW', '6 Series', 'Convertible', 2007),
    ('BMW ActiveHybrid 5 Sedan 2012', 'BMW', 'ActiveHybrid 5', 'Sedan', 2012),
    ('BMW M3 Coupe 2012', 'BMW', 'M3', 'Coupe', 2012),
    ('BMW M5 Sedan 2010', 'BMW', 'M5', 'Sedan', 2010),
    ('BMW M6 Convertible 2010', 'BMW', 'M6', 'Convertible', 2010),
    ('BMW X3 SUV 2012', 'BMW', 'X3', 'SUV', 2012),
    ('BMW X5 SUV 2007', 'BMW', 'X5', 'SUV', 2007),
    ('BMW X6 SUV 2012', 'BMW', 'X6', 'SUV', 2012),
    ('BMW Z4 Convertible 2012', 'BMW', 'Z4', 'Convertible', 2012),
    ('Bentley Arnage Sedan 2009', 'Bentley', 'Arnage', 'Sedan', 2009),
    ('Bentley Continental Flying Spur Sedan 2007', 'Bentley', 'Continental Flying Spur', 'Sedan', 2007),
    ('Bentley Continental GT Coupe 2007', 'Bentley', 'Continental GT', 'Coupe', 2007),
    ('Bentley Continental GT Coupe 2012', 'Bentley', 'Continental GT', 'Coupe', 2012),
    ('Bentley Continental Supersports Conv. Convertible 2012',
     'Bentley', 'Continental Supersports Conv.', 'Convertible', 2012),
    ('Bugatti Veyron 16.4 Convertible 2009', 'Bugatti', 'Veyron 16.4', 'Convertible', 2009),
    ('Bugatti Veyron 16.4 Coupe 2009', 'Bugatti', 'Veyron 16.4', 'Coupe', 2009),
    ('Buick Enclave SUV 2012', 'Buick', 'Enclave', 'SUV', 2012),
    ('Buick Regal GS 2012', 'Buick', 'Regal GS', None, 2012),
    ('Buick Verano Sedan 2012', 'Buick', 'Verano', 'Sedan', 2012),
    ('Cadillac Escalade EXT Crew Cab 2007', 'Cadillac', 'Escalade EXT', 'Crew Cab', 2007),
    ('Cadillac SRX SUV 2012', 'Cadillac', 'SRX', 'SUV', 2012),
    ('Chevrolet Avalanche Crew Cab 2012', 'Chevrolet', 'Avalanche', 'Crew Cab', 2012),
    ('Chevrolet Camaro Convertible 2012', 'Chevrolet', 'Camaro', 'Convertible', 2012),
    ('Chevrolet Cobalt SS 2010', 'Chevrolet', 'Cobalt SS', None, 2010),
    ('Chevrolet Corvette Ron Fellows Edition Z06 2007', 'Chevrolet', 'Corvette Ron Fellows Edition Z06', None, 2007),
    ('Chevrolet Corvette ZR1 2012', 'Chevrolet', 'Corvette ZR1', None, 2012),
    ('Chevrolet Express Cargo Van 2007', 'Chevrolet', 'Express', 'Cargo Van', 2007),
    ('Chevrolet Express Van 2007', 'Chevrolet', 'Express', 'Van', 2007),
    ('Chevrolet HHR SS 2010', 'Chevrolet', 'HHR SS', None, 2010),
    ('Chevrolet Impala Sedan 2007', 'Chevrolet', 'Impala', 'Sedan', 2007),
    ('Chevrolet Malibu Hybrid Sedan 2010', 'Chevrolet', 'Malibu Hybrid', 'Sedan', 2010),
    ('Chevrolet Malibu Sedan 2007', 'Chevrolet', 'Malibu', 'Sedan', 2007),
    ('Chevrolet Monte Carlo Coupe 2007', 'Chevrolet', 'Monte Carlo', 'Coupe', 2007),
    ('Chevrolet Silverado 1500 Classic Extended Cab 2007', 'Chevrolet', 'Silverado 1500 Classic', 'Extended Cab', 2007),
    ('Chevrolet Silverado 1500 Hybrid Crew Cab 2012', 'Chevrolet', 'Silverado 1500 Hybrid', 'Crew Cab', 2012),
    ('Chevrolet Silverado 1500 Regular Cab 2012', 'Chevrolet', 'Silverado 1500', 'Regular Cab', 2012),
    ('Chevrolet Silverado 2500HD Regular Cab 2012', 'Chevrolet', 'Silverado 2500HD', 'Regular Cab', 2012),
    ('Chevrolet Sonic Sedan 2012', 'Chevrolet', 'Sonic', 'Sedan', 2012),
    ('Chevrolet Tahoe Hybrid SUV 2012', 'Chevrolet', 'Tahoe Hybrid', 'SUV', 2012),
    ('Chevrolet TrailBlazer SS 2009', 'Chevrolet', 'TrailBlazer SS', None, 2009),
    ('Chevrolet Traverse SUV 2012', 'Chevrolet', 'Traverse', 'SUV', 2012),
    ('Chrysler 300 SRT-8 2010', 'Chrysler', '300 SRT-8', None, 2010),
    ('Chrysler Aspen SUV 2009', 'Chrysler', 'Aspen', 'SUV', 2009),
    ('Chrysler PT Cruiser Convertible 2008', 'Chrysler', 'PT Cruiser', 'Convertible', 2008),
    ('Chrysler Sebring Convertible 2010', 'Chrysler', 'Sebring', 'Convertible', 2010),
    ('Chrysler Town and Country Minivan 2012', 'Chrysler', 'Town and Country', 'Minivan', 2012),
    ('Daewoo Nubira Wagon 2002', 'Daewoo', 'Nubira', 'Wagon', 2002),
    ('Dodge Caliber Wagon 2007', 'Dodge', 'Caliber', 'Wagon', 2007),
    ('Dodge Caliber Wagon 2012', 'Dodge', 'Caliber', 'Wagon', 2012),
    ('Dodge Caravan Minivan 1997', 'Dodge', 'Caravan', 'Minivan', 1997),
    ('Dodge Challenger SRT8 2011', 'Dodge', 'Challenger SRT8', None, 2011),
    ('Dodge Charger SRT-8 2009', 'Dodge', 'Charger SRT-8', None, 2009),
    ('Dodge Charger Sedan 2012', 'Dodge', 'Charger', 'Sedan', 2012),
    ('Dodge Dakota Club Cab 2007', 'Dodge', 'Dakota', 'Club Cab', 2007),
    ('Dodge Dakota Crew Cab 2010', 'Dodge', 'Dakota', 'Crew Cab', 2010),
    ('Dodge Durango SUV 2007', 'Dodge', 'Durango', 'SUV', 2007),
    ('Dodge Durango SUV 2012', 'Dodge', 'Durango', 'SUV', 2012),
    ('Dodge Journey SUV 2012', 'Dodge', 'Journey', 'SUV', 2012),
    ('Dodge Magnum Wagon 2008', 'Dodge', 'Magnum', 'Wagon', 2008),
    ('Dodge Ram Pickup 3500 Crew Cab 2010', 'Dodge', 'Ram Pickup 3500', 'Crew Cab', 2010),
    ('Dodge Ram Pickup 3500 Quad Cab 2009', 'Dodge', 'Ram Pickup 3500', 'Quad Cab', 2009),
    ('Dodge Sprinter Cargo Van 2009', 'Dodge', 'Sprinter', 'Cargo Van', 2009),
    ('Eagle Talon Hatchback 1998', 'Eagle', 'Talon', 'Hatchback', 1998),
    ('FIAT 500 Abarth 2012', 'FIAT', '500 Abarth', None, 2012),
    ('FIAT 500 Convertible 2012', 'FIAT', '500', 'Convertible', 2012),
    ('Ferrari 458 Italia Convertible 2012', 'Ferrari', '458 Italia', 'Convertible', 2012),
    ('Ferrari 458 Italia Coupe 2012', 'Ferrari', '458 Italia', 'Coupe', 2012),
    ('Fisker Karma Sedan 2012', 'Fisker', 'Karma', 'Sedan', 2012),
    ('Ford E-Series Wagon Van 2012', 'Ford', 'E-Series Wagon', 'Van', 2012),
    ('Ford Edge SUV 2012', 'Ford', 'Edge', 'SUV', 2012),
    ('Ford Expedition EL SUV 2009', 'Ford', 'Expedition EL', 'SUV', 2009),
    ('Ford F-150 Regular Cab 2007', 'Ford', 'F-150', 'Regular Cab', 2007),
    ('Ford F-150 Regular Cab 2012', 'Ford', 'F-150', 'Regular Cab', 2012),
    ('Ford F-450 Super Duty Crew Cab 2012', 'Ford', 'F-450 Super Duty', 'Crew Cab', 2012),
    ('Ford Fiesta Sedan 2012', 'Ford', 'Fiesta', 'Sedan', 2012),
    ('Ford Focus Sedan 2007', 'Ford', 'Focus', 'Sedan', 2007),
    ('Ford Freestar Minivan 2007', 'Ford', 'Freestar', 'Minivan', 2007),
    ('Ford GT Coupe 2006', 'Ford', 'GT', 'Coupe', 2006),
    ('Ford Mustang Convertible 2007', 'Ford', 'Mustang', 'Convertible', 2007),
    ('GMC Acadia SUV 2012', 'GMC', 'Acadia', 'SUV', 2012),
    ('GMC Canyon Extended Cab 2012', 'GMC', 'Canyon', 'Extended Cab', 2012),
    ('GMC Savana Van 2012', 'GMC', 'Savana', 'Van', 2012),
    ('GMC Yukon Hybrid SUV 2012', 'GMC', 'Yukon Hybrid', 'SUV', 2012),
    ('Geo Metro Convertible 1993', 'Geo', 'Metro', 'Convertible', 1993),
    ('HUMMER H2 SUT Crew Cab 2009', 'HUMMER', 'H2 SUT', 'Crew Cab', 2009),
    ('Honda Accord Sedan 2012', 'Honda', 'Accord', 'Sedan', 2012),
    ('Honda Odyssey Minivan 2007', 'Honda', 'Odyssey', 'Minivan', 2007),
    ('Honda Odyssey Minivan 2012', 'Honda', 'Odyssey', 'Minivan', 2012),
    ('Hyundai Accent Sedan 2012', 'Hyundai', 'Accent', 'Sedan', 2012),
    ('Hyundai Azera Sedan 2012', 'Hyundai', 'Azera', 'Sedan', 2012),
    ('Hyundai Elantra Sedan 2007', 'Hyundai', 'Elantra', 'Sedan', 2007),
    ('Hyundai Genesis Sedan 2012', 'Hyundai', 'Genesis', 'Sedan', 2012),
    ('Hyundai Santa Fe SUV 2012', 'Hyundai', 'Santa Fe', 'SUV', 2012),
    ('Hyundai Sonata Hybrid Sedan 2012', 'Hyundai', 'Sonata Hybrid', 'Sedan', 2012),
    ('Hyundai Sonata Sedan 2012', 'Hyundai', 'Sonata', 'Sedan', 2012),
    ('Hyundai Tucson SUV 2012', 'Hyundai', 'Tucson', 'SUV', 2012),
    ('Hyundai Veracruz SUV 2012', 'Hyundai', 'Veracruz', 'SUV', 2012),
    ('Infiniti G Coupe IPL 2012', 'Infiniti', 'G Coupe IPL', 'Coupe', 2012),
    ('Infiniti QX56 SUV 2011', 'Infiniti', 'QX56', 'SUV', 2011),
    ('Isuzu Ascender SUV 2008', 'Isuzu', 'Ascender', 'SUV', 2008),
    ('Jaguar XK XKR 2012', 'Jaguar', 'XK XKR', None, 2012),
    ('Jeep Grand Cherokee SUV 2012', 'Jeep', 'Grand Cherokee', 'SUV', 2012),
    ('Jeep Liberty SUV 2012', 'Jeep', 'Liberty', 'SUV', 2012),
    ('Jeep Patriot SUV 2012', 'Jeep', 'Patriot', 'SUV', 2012),
    ('Jeep Wrangler SUV 2012', 'Jeep', 'Wrangler', 'SUV', 2012),
    ('Lamborghini Diablo Coupe 2001', 'Lamborghini', 'Diablo', 'Coupe', 2001),
    ('Lamborghini Gallardo LP 570-4 Superleggera 2012', 'Lamborghini', 'Gallardo LP 570-4 Superleggera', None, 2012),
    ('Lamborghini Reventon Coupe 2008', 'Lamborghini', 'Reventon', 'Coupe', 2008),
    ('Lincoln Town Car Sedan 2011', 'Lincoln', 'Town Car', 'Sedan', 2011),
    ('Maybach Landaulet Convertible 2012', 'Maybach', 'Landaulet', 'Convertible', 2012),
    ('Mazda Tribute SUV 2011', 'Mazda', 'Tribute', 'SUV', 2011),
    ('McLaren MP4-12C Coupe 2012', 'McLaren', 'MP4-12C', 'Coupe', 2012),
    ('Mercedes-Benz 300-Class Convertible 1993', 'Mercedes-Benz', '300-Class', 'Convertible', 1993),
    ('Mercedes-Benz E-Class Sedan 2012', 'Mercedes-Benz', 'E-Class', 'Sedan', 2012),
    ('Mercedes-Benz S-Class Sedan 2012', 'Mercedes-Benz', 'S-Class', 'Sedan', 2012),
    ('Mercedes-Benz Sprinter Van 2012', 'Mercedes-Benz', 'Sprinter', 'Van', 2012),
    ('Mitsubishi Lancer Sedan 2012', 'Mitsubishi', 'Lancer', 'Sedan', 2012),
    ('Nissan 240SX Coupe 1998', 'Nissan', '240SX', 'Coupe', 1998),
    ('Nissan Juke Hatchback 2012', 'Nissan', 'Juke', 'Hatchback', 2012),
    ('Nissan NV Passenger Van 2012', 'Nissan', 'NV', 'Passenger Van', 2012),
    ('Plymouth Neon Coupe 1999', 'Plymouth', 'Neon', 'Coupe', 1999),
    ('Porsche Panamera Sedan 2012', 'Porsche', 'Panamera', 'Sedan', 2012),
    ('Ram C/V Cargo Van Minivan 2012', 'Ram', 'C/V Cargo Van', 'Minivan', 2012),
    ('Rolls-Royce Phantom Sedan 2012', 'Rolls-Royce', 'Phantom', 'Sedan', 2012),
    ('Scion xD Hatchback 2012', 'Scion', 'xD', 'Hatchback', 2012),
    ('Spyker C8 Convertible 2009', 'Spyker', 'C8', 'Convertible', 2009),
    ('Spyker C8 Coupe 2009', 'Spyker', 'C8', 'Coupe', 2009),
    ('Suzuki Aerio Sedan 2007', 'Suzuki', 'Aerio', 'Sedan', 2007),
    ('Suzuki Kizashi Sedan 2012', 'Suzuki', 'Kizashi', 'Sedan', 2012),
    ('Suzuki SX4 Hatchback 2012', 'Suzuki', 'SX4', 'Hatchback', 2012),
    ('Suzuki SX4 Sedan 2012', 'Suzuki', 'SX4', 'Sedan', 2012),
    ('Tesla Model S Sedan 2012', 'Tesla', 'Model S', 'Sedan', 2012),
    ('Toyota Camry Sedan 2012', 'Toyota', 'Camry', 'Sedan', 2012),
    ('Toyota Corolla Sedan 2012', 'Toyota', 'Corolla', 'Sedan', 2012),
    ('Toyota Sequoia SUV 2012', 'Toyota', 'Sequoia', 'SUV', 2012),
    ('Volkswagen Golf Hatchback 1991', 'Volkswagen', 'Golf', 'Hatchback', 1991),
    ('Volvo 240 Sedan 1993', 'Volvo', '240', 'Sedan', 1993),
    ('Volvo C30 Hatchback 2012', 'Volvo', 'C30', 'Hatchback', 2012),
    ('Volvo XC90 SUV 2007', 'Volvo', 'XC90', 'SUV', 2007),
]

UNKNOWN = [
    ('Aston Martin Virage Coupe 2012', 'Aston Martin', 'Virage', 'Coupe', 2012),
    ('Bentley Mulsanne Sedan 2011', 'Bentley', 'Mulsanne', 'Sedan', 2011),
    ('Buick Rainier SUV 2007', 'Buick', 'Rainier', 'SUV', 2007),
    ('Chrysler Crossfire Convertible 2008', 'Chrysler', 'Crossfire', 'Convertible', 2008),
    ('Ferrari California Convertible 2012', 'Ferrari', 'California', 'Convertible', 2012),
    ('Ferrari FF Coupe 2012', 'Ferrari', 'FF', 'Coupe', 2012),
    ('GMC Terrain SUV 2012', 'GMC', 'Terrain', 'SUV', 2012),
    ('Hyundai Veloster Hatchback 2012', 'Hyundai', 'Veloster', 'Hatchback', 2012),
    ('Land Rover LR2 SUV 2012', 'Land Rover', 'LR2', 'SUV', 2012),
    ('Land Rover Range Rover SUV 2012', 'Land Rover', 'Range Rover', 'SUV', 2012),
    ('Mercedes-Benz C-Class Sedan 2012', 'Mercedes-Benz', 'C-Class', 'Sedan', 2012),
    ('Rolls-Royce Ghost Sedan 2012', 'Rolls-Royce', 'Ghost', 'Sedan', 2012),
    ('Rolls-Royce Phantom Drophead Coupe Convertible 2012',
     'Rolls-Royce', 'Phantom Drophead Coupe', 'Convertible', 2012),
    ('Toyota 4Runner SUV 2012', 'Toyota', '4Runner', 'SUV', 2012),
    ('Volkswagen Beetle Hatchback 2012', 'Volkswagen', 'Beetle', 'Hatchback', 2012),
    ('smart fortwo Convertible 2012', 'smart', 'fortwo', 'Convertible', 2012),
]


def test_the_tables_hold_every_class_once():
    assert len(KNOWN) == 164 and len(UNKNOWN) == 16
    assert len({row[0] for row in KNOWN + UNKNOWN}) == 180


@pytest.mark.parametrize("name, make, model, body, year", KNOWN + UNKNOWN, ids=[row[0] for row in KNOWN + UNKNOWN])
def test_parse(name, make, model, body, year):
    assert parse(name) == {"make": make, "model": model, "body": body, "year": year}


def test_year_is_an_int():
    assert isinstance(parse("BMW M3 Coupe 2012")["year"], int)


@pytest.mark.parametrize("name", ["", "BMW", "BMW 2012", "BMW M3 Coupe", "BMW M3 Coupe 12", "Aston Martin 2012"])
def test_names_that_are_not_make_model_year_are_refused(name):
    with pytest.raises(ClassNameError):
        parse(name)


def write_csv(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file,class_name,stanford_class_id"] + [f"{file},{name},1" for file, name in rows]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_display_names_come_from_the_data_manifest(tmp_path):
    write_csv(tmp_path, [("Ram C-V Cargo Van Minivan 2012/001.jpg", "Ram C/V Cargo Van Minivan 2012"),
                         ("Ram C-V Cargo Van Minivan 2012/002.jpg", "Ram C/V Cargo Van Minivan 2012"),
                         ("BMW M3 Coupe 2012/001.jpg", "BMW M3 Coupe 2012")])
    labels = ["BMW M3 Coupe 2012", "Ram C-V Cargo Van Minivan 2012", "Volvo 240 Sedan 1993"]
    assert display_names(labels, tmp_path) == ["BMW M3 Coupe 2012", "Ram C/V Cargo Van Minivan 2012",
                                               "Volvo 240 Sedan 1993"]


def test_display_names_fall_back_to_the_folder_names(tmp_path):
    labels = ["Ram C-V Cargo Van Minivan 2012"]
    assert display_names(labels, None) == labels
    assert display_names(labels, tmp_path / "missing") == labels


def test_class_fields_are_in_labels_order(tmp_path):
    write_csv(tmp_path, [("Ram C-V Cargo Van Minivan 2012/001.jpg", "Ram C/V Cargo Van Minivan 2012")])
    fields = class_fields(["Ram C-V Cargo Van Minivan 2012", "Jaguar XK XKR 2012"], tmp_path)
    assert fields == [
        {"label": "Ram C-V Cargo Van Minivan 2012", "name": "Ram C/V Cargo Van Minivan 2012", "make": "Ram",
         "model": "C/V Cargo Van", "body": "Minivan", "year": 2012},
        {"label": "Jaguar XK XKR 2012", "name": "Jaguar XK XKR 2012", "make": "Jaguar", "model": "XK XKR",
         "body": None, "year": 2012}]


def test_command_writes_the_classes_into_a_version(tmp_path):
    version = tmp_path / "1"
    version.mkdir()
    (version / "labels.txt").write_text("BMW M3 Coupe 2012\nRam C-V Cargo Van Minivan 2012\n", encoding="utf-8")
    data = tmp_path / "cars"
    write_csv(data, [("Ram C-V Cargo Van Minivan 2012/001.jpg", "Ram C/V Cargo Van Minivan 2012")])
    manifest = {"format_version": 2, "files": {"labels": {"file": "labels.txt", "sha256": "x"}},
                "source": {"training": {"data": str(data)}}}
    (version / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    os.chmod(version / "manifest.json", 0o644)
    assert classnames.main([str(version)]) == 0
    written = json.loads((version / "manifest.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in written["classes"]] == ["BMW M3 Coupe 2012", "Ram C/V Cargo Van Minivan 2012"]
    assert {k: v for k, v in written.items() if k != "classes"} == manifest
    assert (version / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in version.iterdir()) == ["labels.txt", "manifest.json"]


def test_command_reports_a_name_it_cannot_parse(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("Mystery\n", encoding="utf-8")
    before = json.dumps({"format_version": 2, "files": {"labels": {"file": "labels.txt", "sha256": "x"}}})
    (tmp_path / "manifest.json").write_text(before, encoding="utf-8")
    assert classnames.main([str(tmp_path)]) == 1
    assert "Mystery" in capsys.readouterr().err
    assert (tmp_path / "manifest.json").read_text(encoding="utf-8") == before
