"""Base classes and their template groups: the synthetic world's shape families, ARD supplement C's
table 6, and the COCO classes.

``LVIS_GROUP_CLASSES`` is table 6 as printed: LVIS category names per template group. The
printed table ends before its ``misc_objects`` row, so every LVIS class it does not list falls in
``misc_objects``. ``COCO_CLASSES`` are the 80 COCO instance categories (COCO-type data use table 4
for every class); their group is looked up by name in table 6.
"""

from __future__ import annotations

import re

# The synthetic world's base classes (shape families) and their template group.
WORLD_CLASSES: dict[str, str] = {
    "cat": "living_creatures", "dog": "living_creatures", "bird": "living_creatures", "fish": "living_creatures",
    "hat": "wearables", "shoe": "wearables",
    "chair": "furniture_decor", "lamp": "furniture_decor", "vase": "furniture_decor", "clock": "furniture_decor",
    "hammer": "tools_objects", "key": "tools_objects",
    "car": "transportation", "boat": "transportation", "bicycle": "transportation",
    "phone": "tech_electronics", "camera": "tech_electronics",
    "mug": "food_drink", "bottle": "food_drink", "apple": "food_drink",
    "tree": "outdoor_nature", "flower": "outdoor_nature",
    "ball": "sports_play", "kite": "sports_play",
    "book": "misc_objects", "umbrella": "misc_objects",
}

LVIS_GROUP_CLASSES: dict[str, tuple[str, ...]] = {
    "living_creatures": (
        "baboon", "bat_(animal)", "bear", "beetle", "bird", "cow", "black_sheep", "bull", "bulldog", "butterfly",
        "calf", "camel", "cat", "chicken_(animal)", "cock", "cockroach", "cougar", "crab_(animal)", "crow",
        "dalmatian", "deer", "dog", "dolphin", "domestic_ass", "dove", "dragonfly", "duck", "cub_(animal)",
        "duckling", "eagle", "eel", "elephant", "elk", "falcon", "ferret", "fish", "flamingo", "foal", "frog",
        "gazelle", "giant_panda", "giraffe", "goat", "goldfish", "goose", "gorilla", "grizzly", "gull", "hamster",
        "heron", "hippopotamus", "hog", "horse", "hornet", "hummingbird", "kitten", "koala", "ladybug",
        "lamb_(animal)", "lion", "lizard", "mallard", "mammoth", "manatee", "monkey", "octopus_(animal)", "ostrich",
        "owl", "parakeet", "parrot", "pelican", "penguin", "pigeon", "puffer_(fish)", "puffin", "pug-dog", "puppy",
        "rabbit", "ram_(animal)", "rat", "rhinoceros", "rodent", "seabird", "seahorse", "shark", "sheep",
        "shepherd_dog", "snake", "spider", "crawfish", "squirrel", "starfish", "tiger", "turtle", "vulture", "walrus",
        "wolf", "zebra", "polar_bear", "pony", "pet",
    ),
    "wearables": (
        "apron", "arctic_(type_of_shoe)", "armband", "armor", "bandanna", "ballet_skirt", "baseball_cap",
        "baseball_glove", "beanie", "belt", "belt_buckle", "beret", "bib", "visor", "blazer", "blouse", "bolo_tie",
        "bonnet", "boot", "bow_(decorative_ribbons)", "bow-tie", "bowler_hat", "boxing_glove", "suspenders",
        "bracelet", "brassiere", "breech cloth", "bridal_gown", "bulletproof_vest", "cap_(headwear)", "cape",
        "cardigan", "chain_mail", "choker", "cloak", "coat", "corset", "costume", "coverall", "cowboy_hat", "crown",
        "diaper", "dress", "dress_hat", "dress_suit", "tux", "underdrawers", "leather", "earplug", "earring",
        "eyepatch", "fedora", "flannel", "flip-flop_(sandal)", "flipper_(footwear)", "fleece", "gasmask", "glove",
        "goggles", "halter_top", "hat", "helmet", "headband", "headscarf", "jacket", "jean", "jersey", "jewelry",
        "jumpsuit", "kilt", "kimono", "knee_pad", "lab_coat", "leggings_(clothing)", "life_jacket", "mask", "mitten",
        "neckerchief", "necklace", "necktie", "nightshirt", "overalls_(clothing)", "pajamas", "parka", "polo_shirt",
        "poncho", "robe", "scarf", "shawl", "shirt", "shoe", "short_pants", "ski_parka", "skirt", "skullcap",
        "sling_(bandage)", "slipper_(footwear)", "sock", "sombrero", "sportswear", "suit_(clothing)", "sunhat",
        "sweat_pants", "sweatband", "sweater", "sweatshirt", "swimsuit", "tank_top_(clothing)", "tartan",
        "tights_(clothing)", "trench_coat", "trousers", "turban", "turtleneck_(clothing)", "underwear", "vest",
        "wristband", "wristlet", "wig", "broach", "cincture", "hairnet", "handkerchief", "veil", "lanyard",
        "legging_(clothing)", "pantyhose", "raincoat", "sandal_(type_of_shoe)", "sunglasses", "tiara", "wedding_ring",
    ),
    "furniture_decor": (
        "armoire", "bath_mat", "bath_towel", "bathrobe", "bathtub", "bed", "bedpan", "bedspread", "bench",
        "billboard", "birdbath", "birdcage", "birdhouse", "blackboard", "blanket", "bookcase", "bunk_bed",
        "bulletin_board", "cabinet", "locker", "chair", "chaise_longue", "chandelier", "clock", "clock_tower",
        "clothes_hamper", "coatrack", "coffee_table", "crib", "curtain", "cushion", "cupboard", "deck_chair", "desk",
        "dining_table", "dresser", "drawer", "snowman", "easel", "electric_chair", "fan", "fireplace",
        "folding_chair", "footstool", "futon", "hamper", "headboard", "highchair", "kitchen_table", "lamp",
        "lamppost", "lampshade", "lantern", "loveseat", "manger", "mattress", "mirror", "ottoman",
        "pew_(church_bench)", "pillow", "playpen", "recliner", "rocking_chair", "sofa", "stool", "table",
        "table_lamp", "tablecloth", "tapestry", "towel_rack", "trunk", "wardrobe", "washbasin", "beanbag",
        "music_stool", "sofa_bed", "vase",
    ),
    "tools_objects": (
        "alarm_clock", "ashtray", "atomizer", "award", "ax", "backpack", "handbag", "suitcase", "Band_Aid", "bandage",
        "barrel", "barrette", "barrow", "basket", "battery", "bead", "beeper", "bell", "Bible", "binder",
        "binoculars", "bob", "bobbin", "bobby_pin", "bottle_opener", "bread-bin", "broom", "bucket", "business_card",
        "button", "calendar", "can_opener", "calculator", "candle_holder", "walking_cane", "canister", "canteen",
        "bottle_cap", "car_battery", "cast", "cash_register", "checkbook", "clip", "clipboard",
        "clippers_(for_plants)", "clutch_bag", "coaster", "coat_hanger", "combination_lock", "compass",
        "cork_(bottle_plug)", "corkboard", "corkscrew", "crutch", "doorknob", "doormat", "dropper", "drill", "dagger",
        "dental_floss", "cistern", "cleansing_agent", "frying_pan", "sewing_machine", "shower_head", "shower_curtain",
        "stirrup", "oven", "duct_tape", "dustpan", "earphone", "eraser", "file_(tool)", "fire_alarm",
        "fire_extinguisher", "fire_hose", "first-aid_kit", "flashlight", "funnel", "garbage", "garbage_truck",
        "garden_hose", "grater", "hammer", "hairbrush", "hair_dryer", "handcart", "handcuff", "handle", "handsaw",
        "hinge", "hook", "igniter", "iron_(for_clothing)", "ironing_board", "kettle", "key", "keycard", "knife",
        "knitting_needle", "knob", "knocker_(on_a_door)", "ladder", "ladle", "latch", "lawn_mower", "lightbulb",
        "lightning_rod", "mallet", "marker", "measuring_cup", "measuring_stick", "microscope", "motor", "nailfile",
        "needle", "nutcracker", "oar", "padlock", "paintbrush", "palette", "peeler_(tool_for_fruit_and_vegetables)",
        "pencil", "pencil_box", "pencil_sharpener", "pendulum", "pitchfork", "pliers", "plow_(farm_equipment)",
        "pocketknife", "poker_(fire_stirring_tool)", "power_shovel", "puncher", "razorblade", "reamer_(juicer)",
        "rolling_pin", "rubber_band", "safety_pin", "scissors", "scraper", "screwdriver", "scrubbing_brush",
        "shaver_(electric)", "sharpener", "shredder_(for_paper)", "shovel", "skewer", "spatula", "spear",
        "stapler_(stapling_machine)", "steering_wheel", "stepladder", "step_stool", "stirrer", "strainer",
        "tape_measure", "thermometer", "thimble", "thread", "thumbtack", "tongs", "toolbox", "toothbrush",
        "toothpaste", "toothpick", "vacuum_cleaner", "watering_can", "wrench", "cigarette_case", "clothespin",
        "clasp", "coil", "colander", "crowbar", "cufflink", "detergent", "faucet", "file_cabinet", "freshener",
        "fume_hood", "griddle", "grill", "hookah", "hose", "inkpad", "mixer_(kitchen_tool)", "nosebag_(for_animals)",
        "noseband_(for_animals)", "oil_lamp", "parking_meter", "pegboard", "pepper_mill", "radiator",
        "scale_(measuring_instrument)", "scoreboard", "shaker", "shampoo", "Sharpie", "shaving_cream", "shears",
        "shield", "shot_glass", "strap", "straw_(for_drinking)", "vent", "walking_stick", "automatic_washer", "wok",
    ),
    "transportation": (
        "ambulance", "baby_buggy", "barge", "bicycle", "blimp", "boat", "bulldozer", "bullet_train", "bus_(vehicle)",
        "cab_(taxi)", "camper_(vehicle)", "canoe", "car_(automobile)", "railcar_(part_of_a_train)", "elevator_car",
        "cargo_ship", "horse_carriage", "cart", "convertible_(automobile)", "cruise_ship", "police_cruiser", "dinghy",
        "fighter_jet", "ferry", "freight_car", "golfcart", "gondola_(boat)", "helicopter", "hot-air_balloon",
        "houseboat", "jeep", "jet_plane", "kayak", "limousine", "minivan", "motor_scooter", "motor_vehicle",
        "motorcycle", "passenger_car_(part_of_a_train)", "passenger_ship", "pickup_truck", "race_car", "raft",
        "school_bus", "seaplane", "snowmobile", "space_shuttle", "stagecoach", "tow_truck",
        "tractor_(farm_equipment)", "trailer_truck", "train_(railroad_vehicle)", "tricycle", "truck", "unicycle",
        "wagon", "yacht", "horse_buggy", "cabin_car", "river_boat", "army_tank", "wagon_wheel", "dirt_bike",
    ),
    "tech_electronics": (
        "monitor_(computer_equipment)", "remote_control", "air_conditioner", "amplifier", "antenna", "blender",
        "blinker", "camera", "camera_lens", "camcorder", "CD_player", "cellular_telephone", "computer_keyboard",
        "drone", "dispenser", "generator", "iPod", "laptop_computer", "microphone", "speaker_(stereo_equipment)",
        "mouse_(computer_equipment)", "mousepad", "printer", "projector", "radio_receiver", "radar", "record_player",
        "router_(computer_equipment)", "spotlight", "stereo_(sound_system)", "subwoofer", "tachometer", "telephone",
        "telephone_booth", "telephoto_lens", "television_camera", "television_set", "timer", "typewriter",
        "vending_machine", "webcam", "computer_monitor", "traffic_light", "videotape",
    ),
    "food_drink": (
        "almond", "apple", "applesauce", "apricot", "artichoke", "asparagus", "avocado", "bagel", "baguet", "banana",
        "batter_(food)", "bean_curd", "beef_(food)", "beer_bottle", "beer_can", "bell_pepper", "birthday_cake",
        "blackberry", "blueberry", "boiled_egg", "bread", "broccoli", "brownie", "brussels_sprouts", "bubble_gum",
        "bun", "burrito", "butter", "cake", "candy_bar", "candy_cane", "cantaloup", "cappuccino", "carrot",
        "casserole", "cherry", "chickpea", "chili_(vegetable)", "chocolate_bar", "chocolate_cake", "chocolate_milk",
        "chocolate_mousse", "cider", "cigar_box", "cigarette", "coconut", "cocoa_(beverage)", "coffee_maker",
        "coffeepot", "coleslaw", "cornbread", "cornmeal", "crabmeat", "cracker", "crescent_roll", "cucumber", "cup",
        "trophy_cup", "cupcake", "date_(fruit)", "doughnut", "edible_corn", "eclair", "egg", "egg_roll", "egg_yolk",
        "eggplant", "fig_(fruit)", "fish_(food)", "French_toast", "fruit_juice", "fudge", "garlic", "ginger", "gourd",
        "grape", "green_bean", "green_onion", "grits", "ham", "hamburger", "honey", "hot_sauce", "hummus", "icecream",
        "popsicle", "jam", "kiwi_fruit", "lasagna", "lemon", "lemonade", "lettuce", "lime", "liquor", "lollipop",
        "mandarin_orange", "mashed_potato", "meatball", "melon", "milk", "milkshake", "mint_candy", "muffin", "mug",
        "mushroom", "nut", "octopus_(food)", "omelet", "onion", "orange_(fruit)", "orange_juice", "pancake", "papaya",
        "pastry", "patty_(food)", "pea_(food)", "peach", "peanut_butter", "pear", "pickle", "pie", "pizza",
        "pita_(bread)", "plate", "platter", "pop_(soda)", "pork_rib", "potato", "pretzel", "pudding", "quesadilla",
        "quiche", "raspberry", "root_beer", "salad", "salad_plate", "salami", "salmon_(food)", "salsa", "sausage",
        "sherbert", "smoothie", "soup", "soup_bowl", "soup_spoon", "sour_cream", "soya_milk", "squid_(food)",
        "steak_(food)", "stew", "strawberry", "string_cheese", "sugar_bowl", "sushi", "sweet_potato", "Tabasco_sauce",
        "taco", "tequila", "toast_(food)", "tomato", "tortilla", "truffle_(chocolate)", "turnip", "vinegar", "waffle",
        "water_bottle", "watermelon", "wedding_cake", "whipped_cream", "wine_bottle", "yogurt", "zucchini",
        "cauliflower", "cayenne_(spice)", "celery", "clementine", "crisp_(potato_chip)", "cookie", "escargot",
        "gelatin", "jelly_bean", "lamb_chop", "legume", "lip_balm", "olive_oil", "pepper", "persimmon", "pineapple",
        "prune", "prawn", "pumpkin", "rib_(food)", "salmon_(fish)", "saltshaker", "sandwich", "saucepan", "saucer",
        "steak_knife", "vodka", "waffle_iron",
    ),
    "outdoor_nature": (
        "aquarium", "awning", "bamboo", "bait", "birdfeeder", "bouquet", "buoy", "cabana", "candle", "carnation",
        "cleat_(for_securing_ropes)", "cornice", "flower_arrangement", "gravy_boat", "gravestone", "log", "nest",
        "parasol", "plume", "saddle_(on_an_animal)", "saddle_blanket", "sunflower", "sugarcane_(plant)",
        "weathervane", "window_box_(for_plants)", "seashell", "blinder_(for_horses)",
    ),
    "sports_play": (
        "basketball_backboard", "ball", "balloon", "baseball", "baseball_bat", "basketball", "barbell", "bass_horn",
        "beach_ball", "gameboard", "bow_(weapon)", "bowling_ball", "chessboard", "checkerboard", "chopping_board",
        "chopstick", "poker_chip", "diving_board", "football_(American)", "football_helmet", "frisbee", "golf_club",
        "hockey_stick", "home_plate_(baseball)", "mound_(baseball)", "paddle", "parasail_(sports)", "ping-pong_ball",
        "pole", "pool_table", "racket", "roller_skate", "Rollerblade", "sled", "ski", "ski_boot", "ski_pole",
        "skateboard", "snowboard", "soccer_ball", "softball", "surfboard", "table-tennis_table", "tennis_ball",
        "tennis_racket", "trampoline", "volleyball", "water_ski", "slide", "triangle_(musical_instrument)",
        "tambourine",
    ),
}

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

DEFAULT_GROUP = "misc_objects"


def class_word(name: str) -> str:
    """The words a class name is written with in a prompt: ``"bat_(animal)"`` -> ``"bat"``, ``"baseball_cap"`` -> ``"baseball cap"``."""
    word = re.sub(r"_?\([^)]*\)", "", name).replace("_", " ").strip()
    return re.sub(r"\s+", " ", word) or name


def _key(name: str) -> str:
    return class_word(name).lower()


_GROUP_OF: dict[str, str] = {}
for _group, _names in LVIS_GROUP_CLASSES.items():
    for _name in _names:
        _GROUP_OF.setdefault(_name.lower(), _group)
        _GROUP_OF.setdefault(_key(_name), _group)


def group_of(name: str) -> str:
    """The template group of a base class: table 6 by exact LVIS name, else by its words, else ``misc_objects``."""
    return _GROUP_OF.get(name.lower(), _GROUP_OF.get(_key(name), DEFAULT_GROUP))
