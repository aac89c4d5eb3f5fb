"""Word lists the task generators draw from (embedded, so samples never depend on a download).

The lists hold concrete, fairly rare English words so that keys and values seldom collide with the
haystacks; every generator still checks for collisions and draws again when one happens.
"""

from __future__ import annotations

from functools import cache

# fmt: off
ADJECTIVES: tuple[str, ...] = (
    "abundant", "adorable", "agreeable", "amber", "amused", "ancient", "angry", "anxious", "aquatic", "arctic",
    "ardent", "august", "autumnal", "bashful", "bitter", "blazing", "bleak", "blissful", "blushing", "boisterous",
    "bouncy", "brave", "breezy", "brittle", "bronze", "bumpy", "buttery", "calm", "candid", "carefree", "cautious",
    "charming", "cheerful", "chilly", "chubby", "clever", "cloudy", "clumsy", "cobalt", "colossal", "courageous",
    "cozy", "crafty", "creamy", "crimson", "crispy", "crooked", "crowded", "cuddly", "curious", "curly", "dainty",
    "dapper", "dazzling", "delightful", "dizzy", "drowsy", "dusty", "eager", "earnest", "elated", "elegant",
    "emerald", "enchanted", "energetic", "fancy", "feathery", "ferocious", "fierce", "fiery", "flaky", "flashy",
    "fluffy", "foggy", "fragile", "fragrant", "frosty", "frugal", "fuzzy", "gentle", "giddy", "gigantic",
    "gleaming", "glossy", "glowing", "golden", "graceful", "grumpy", "gusty", "handsome", "hasty", "hazy", "hearty",
    "hollow", "humble", "hungry", "icy", "idle", "indigo", "jagged", "jolly", "jovial", "joyful", "juicy", "jumpy",
    "knobby", "lanky", "lavish", "lazy", "leafy", "lively", "lonely", "loyal", "lucky", "lumpy", "luminous",
    "magenta", "majestic", "mellow", "merry", "mighty", "misty", "modest", "moody", "mossy", "muddy", "musty",
    "mysterious", "nautical", "nervous", "nimble", "noisy", "nutty", "oblong", "odd", "olive", "opulent", "ornate",
    "pale", "peaceful", "peppery", "perky", "plucky", "plump", "polished", "prickly", "proud", "puffy", "purple",
    "quaint", "quick", "quiet", "quirky", "radiant", "ragged", "rapid", "rusty", "salty", "sandy", "scarlet",
    "scrawny", "shaggy", "shiny", "shy", "silky", "silver", "sleepy", "slender", "slimy", "sloppy", "smoky",
    "smooth", "snowy", "soggy", "solemn", "sparkling", "speckled", "spicy", "spiky", "splendid", "spotted",
    "squeaky", "stale", "steady", "sticky", "stormy", "striped", "stubborn", "sturdy", "sunny", "swift", "tangy",
    "tawny", "tender", "thirsty", "thorny", "thrifty", "timid", "tiny", "tranquil", "trusty", "turquoise", "velvet",
    "vibrant", "vigilant", "violet", "vivid", "wandering", "wary", "wealthy", "weary", "whimsical", "wicked",
    "wiggly", "wild", "windy", "wise", "witty", "wobbly", "wooden", "woolly", "zany", "zealous", "zesty",
)

NOUNS: tuple[str, ...] = (
    "accordion", "acorn", "albatross", "alpaca", "anchor", "anemone", "antelope", "apricot", "armadillo",
    "avalanche", "avocado", "badger", "bagpipe", "balcony", "bamboo", "banjo", "barnacle", "barracuda", "basil",
    "beacon", "beaver", "beetle", "biscuit", "bison", "blackbird", "blizzard", "blossom", "bluebell", "bonfire",
    "bonnet", "boulder", "bramble", "brioche", "broccoli", "buffalo", "bugle", "bumblebee", "burrito", "butterfly",
    "cabbage", "cactus", "camel", "canary", "candle", "canoe", "canyon", "caramel", "caravan", "cardigan",
    "carnation", "carrot", "cathedral", "catfish", "cauldron", "cello", "chameleon", "cheetah", "chestnut",
    "chimney", "chinchilla", "chipmunk", "cinnamon", "clarinet", "coconut", "comet", "compass", "coral",
    "cormorant", "cottage", "coyote", "crayon", "cricket", "crocodile", "croissant", "crocus", "cucumber",
    "cupcake", "cypress", "daffodil", "dandelion", "dolphin", "donkey", "dragonfly", "dumpling", "eggplant",
    "elephant", "emu", "falcon", "ferret", "fiddle", "flamingo", "flute", "fossil", "foxglove", "gadget", "galaxy",
    "gazelle", "geyser", "giraffe", "glacier", "gondola", "gooseberry", "gorilla", "granola", "grasshopper",
    "guitar", "hammock", "hamster", "harbor", "harmonica", "harp", "hazelnut", "hedgehog", "heron", "hibiscus",
    "hippo", "honeybee", "horizon", "hummingbird", "hurricane", "hyacinth", "iceberg", "iguana", "igloo", "jackal",
    "jaguar", "jasmine", "jellyfish", "kangaroo", "kayak", "kettle", "kiwi", "koala", "ladybug", "lagoon",
    "lantern", "lavender", "lemonade", "leopard", "lighthouse", "lilac", "limestone", "llama", "lobster",
    "lollipop", "lotus", "lynx", "macaroon", "magnolia", "mandolin", "mango", "maple", "marigold", "marmot",
    "marshmallow", "meadow", "meerkat", "melon", "meteor", "mongoose", "moose", "mosquito", "muffin", "mushroom",
    "narwhal", "nectarine", "nightingale", "nutmeg", "oasis", "oatmeal", "octopus", "orchid", "ostrich", "otter",
    "owl", "oyster", "paddle", "pancake", "panda", "panther", "papaya", "parachute", "parrot", "parsley", "peacock",
    "pebble", "pelican", "penguin", "peppermint", "pheasant", "piano", "pickle", "pigeon", "pineapple", "pistachio",
    "plum", "pomegranate", "poppy", "porcupine", "potato", "pretzel", "puffin", "pumpkin", "puppet", "quail",
    "quartz", "quokka", "rabbit", "raccoon", "radish", "rainbow", "raisin", "raspberry", "raven", "reindeer",
    "rhubarb", "robin", "rooster", "saffron", "salamander", "sandal", "sardine", "saxophone", "scarecrow",
    "scorpion", "seagull", "seahorse", "sequoia", "shamrock", "sparrow", "spinach", "squirrel", "starfish",
    "stingray", "strawberry", "submarine", "sunflower", "swallow", "swan", "tambourine", "tangerine", "teapot",
    "thimble", "thistle", "thunder", "tiger", "toboggan", "tortoise", "toucan", "trombone", "trumpet", "tulip",
    "turnip", "turtle", "ukulele", "umbrella", "unicorn", "violin", "volcano", "vulture", "waffle", "walnut",
    "walrus", "warbler", "waterfall", "weasel", "whale", "whistle", "willow", "wolverine", "wombat", "woodpecker",
    "xylophone", "yak", "zebra", "zeppelin", "zucchini",
)

# Syllables and first names for invented proper names (qa).
NAME_ONSETS: tuple[str, ...] = (
    "b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "qu", "r", "s", "st", "t",
    "th", "tr", "v", "w", "z",
)
NAME_VOWELS: tuple[str, ...] = (
    "a", "e", "i", "o", "u", "ae", "ai", "ei", "ia", "io", "ou",
)
NAME_CODAS: tuple[str, ...] = (
    "l", "n", "r", "s", "th", "nd", "rn", "ld", "st", "x", "m",
)
FIRST_NAMES: tuple[str, ...] = (
    "Adela", "Aldric", "Anselm", "Beatrix", "Bertram", "Caspian", "Cordelia", "Dorian", "Edmund", "Elowen",
    "Esmond", "Fenella", "Florian", "Gideon", "Greta", "Hadrian", "Isolde", "Jasper", "Leopold", "Linnea", "Lucian",
    "Magnus", "Marisol", "Matthias", "Mirela", "Nerys", "Octavia", "Oswin", "Perpetua", "Quentin", "Rosalind",
    "Sabine", "Severin", "Tobias", "Ursula", "Valentin", "Wilhelmina", "Xavier", "Ysolde", "Zenobia",
)
# fmt: on


@cache
def cwe_vocabulary() -> tuple[str, ...]:
    """Words for ``common_words``: adjectives and nouns, none a substring of another (sorted)."""
    words = sorted(set(ADJECTIVES) | set(NOUNS))
    return tuple(w for w in words if not any(w != o and w in o for o in words))
