-- The bundled sample shop: invented customers, products and orders (not real data).
-- Loaded by tasks.sample.build_sample_db; the gold SQL of questions.jsonl is written for it (SQLite).

CREATE TABLE customers (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    email       TEXT NOT NULL UNIQUE,
    city        TEXT,
    country     TEXT NOT NULL,
    signup_date TEXT NOT NULL          -- ISO date, YYYY-MM-DD
);

CREATE TABLE products (
    id       INTEGER PRIMARY KEY,
    name     TEXT NOT NULL,
    category TEXT NOT NULL,
    price    REAL NOT NULL CHECK (price > 0),   -- current list price, EUR
    stock    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE orders (
    id          INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    order_date  TEXT NOT NULL,         -- ISO date, YYYY-MM-DD
    status      TEXT NOT NULL CHECK (status IN ('pending', 'shipped', 'delivered', 'cancelled'))
);

CREATE TABLE order_items (
    order_id   INTEGER NOT NULL REFERENCES orders (id),
    product_id INTEGER NOT NULL REFERENCES products (id),
    quantity   INTEGER NOT NULL CHECK (quantity > 0),
    unit_price REAL NOT NULL,          -- price paid per unit, after any discount, EUR
    PRIMARY KEY (order_id, product_id)
);

INSERT INTO customers (id, name, email, city, country, signup_date) VALUES
    (1, 'Ada Lindqvist', 'ada.lindqvist@example.com', 'Stockholm', 'Sweden', '2024-10-15'),
    (2, 'Bruno Marchetti', 'bruno.marchetti@example.com', 'Milan', 'Italy', '2024-01-30'),
    (3, 'Clara Ferreira', 'clara.ferreira@example.org', 'Lisbon', 'Portugal', '2024-10-12'),
    (4, 'Dmitri Novak', 'dmitri.novak@example.com', 'Prague', 'Czechia', '2023-12-15'),
    (5, 'Elena Ruiz', 'elena.ruiz@example.com', 'Madrid', 'Spain', '2023-04-13'),
    (6, 'Felix Baumann', 'felix.baumann@example.org', 'Hamburg', 'Germany', '2023-12-02'),
    (7, 'Greta Olsen', 'greta.olsen@example.com', 'Oslo', 'Norway', '2024-04-08'),
    (8, 'Hugo Lefebvre', 'hugo.lefebvre@example.com', 'Lyon', 'France', '2024-03-18'),
    (9, 'Ines Duarte', 'ines.duarte@example.org', 'Porto', 'Portugal', '2023-03-05'),
    (10, 'Jonas Weber', 'jonas.weber@example.com', 'Munich', 'Germany', '2023-04-04'),
    (11, 'Katarina Horvat', 'katarina.horvat@example.com', 'Zagreb', 'Croatia', '2023-08-30'),
    (12, 'Luca Bianchi', 'luca.bianchi@example.org', 'Turin', 'Italy', '2023-06-25'),
    (13, 'Marta Kowalska', 'marta.kowalska@example.com', 'Krakow', 'Poland', '2024-02-25'),
    (14, 'Nils Eriksson', 'nils.eriksson@example.com', 'Gothenburg', 'Sweden', '2024-03-11'),
    (15, 'Olivia Brooks', 'olivia.brooks@example.org', 'Leeds', 'United Kingdom', '2023-07-22'),
    (16, 'Pierre Dubois', 'pierre.dubois@example.com', 'Paris', 'France', '2023-11-02'),
    (17, 'Quinn Murphy', 'quinn.murphy@example.com', NULL, 'Ireland', '2023-03-15'),
    (18, 'Rosa Jansen', 'rosa.jansen@example.org', 'Utrecht', 'Netherlands', '2023-03-08'),
    (19, 'Sofia Greco', 'sofia.greco@example.com', 'Naples', 'Italy', '2023-12-17'),
    (20, 'Tomasz Zielinski', 'tomasz.zielinski@example.com', 'Warsaw', 'Poland', '2023-03-29'),
    (21, 'Ulla Schmidt', 'ulla.schmidt@example.org', 'Berlin', 'Germany', '2024-02-03'),
    (22, 'Victor Moreau', 'victor.moreau@example.com', 'Nantes', 'France', '2023-11-13');

INSERT INTO products (id, name, category, price, stock) VALUES
    (1, 'Trail Running Shoes', 'Outdoor', 119.90, 34),
    (2, 'Ultralight Tent 2P', 'Outdoor', 349.00, 8),
    (3, 'Insulated Water Bottle', 'Outdoor', 24.50, 120),
    (4, 'Headlamp 400lm', 'Outdoor', 39.95, 55),
    (5, 'Cast Iron Skillet', 'Kitchen', 44.00, 40),
    (6, 'Chef''s Knife 20cm', 'Kitchen', 89.00, 25),
    (7, 'Pour-Over Coffee Set', 'Kitchen', 32.75, 60),
    (8, 'Bamboo Cutting Board', 'Kitchen', 18.20, 75),
    (9, 'The Quiet Harbor (novel)', 'Books', 16.99, 200),
    (10, 'Practical SQL Handbook', 'Books', 42.50, 30),
    (11, 'Mountain Birds Field Guide', 'Books', 27.00, 45),
    (12, 'Noise-Cancelling Headphones', 'Electronics', 229.00, 15),
    (13, 'USB-C Charging Hub', 'Electronics', 49.90, 80),
    (14, 'E-Reader 7in', 'Electronics', 139.00, 22),
    (15, 'Pruning Shears', 'Garden', 21.40, 65),
    (16, 'Raised Bed Kit', 'Garden', 158.00, 6),
    (17, 'Herb Seed Collection', 'Garden', 12.60, 150),
    (18, 'Smart Plant Sensor', 'Electronics', 34.00, 3);

INSERT INTO orders (id, customer_id, order_date, status) VALUES
    (1, 4, '2024-01-04', 'delivered'),
    (2, 22, '2024-01-08', 'delivered'),
    (3, 17, '2024-01-11', 'delivered'),
    (4, 19, '2024-01-31', 'delivered'),
    (5, 16, '2024-02-02', 'delivered'),
    (6, 19, '2024-03-06', 'cancelled'),
    (7, 2, '2024-03-06', 'delivered'),
    (8, 10, '2024-03-17', 'delivered'),
    (9, 10, '2024-04-04', 'delivered'),
    (10, 5, '2024-04-30', 'delivered'),
    (11, 8, '2024-05-08', 'delivered'),
    (12, 13, '2024-05-16', 'delivered'),
    (13, 8, '2024-06-04', 'cancelled'),
    (14, 13, '2024-06-17', 'cancelled'),
    (15, 10, '2024-06-23', 'delivered'),
    (16, 5, '2024-07-05', 'delivered'),
    (17, 16, '2024-07-08', 'delivered'),
    (18, 6, '2024-07-14', 'delivered'),
    (19, 5, '2024-08-02', 'cancelled'),
    (20, 14, '2024-08-08', 'delivered'),
    (21, 19, '2024-08-15', 'delivered'),
    (22, 4, '2024-08-26', 'cancelled'),
    (23, 2, '2024-09-24', 'delivered'),
    (24, 17, '2024-10-02', 'delivered'),
    (25, 19, '2024-10-21', 'delivered'),
    (26, 13, '2024-12-07', 'pending'),
    (27, 6, '2024-12-08', 'shipped'),
    (28, 16, '2024-12-11', 'pending');

INSERT INTO order_items (order_id, product_id, quantity, unit_price) VALUES
    (1, 10, 3, 38.25),
    (2, 6, 1, 89.00),
    (3, 14, 1, 139.00),
    (4, 3, 4, 24.50),
    (4, 6, 1, 89.00),
    (4, 10, 1, 38.25),
    (5, 17, 2, 12.60),
    (5, 9, 1, 16.99),
    (6, 6, 1, 89.00),
    (6, 14, 1, 139.00),
    (7, 8, 2, 16.38),
    (8, 12, 1, 206.10),
    (8, 11, 4, 27.00),
    (9, 15, 1, 21.40),
    (9, 12, 1, 229.00),
    (9, 1, 1, 119.90),
    (10, 5, 3, 44.00),
    (10, 6, 1, 89.00),
    (11, 14, 1, 125.10),
    (11, 9, 3, 15.29),
    (12, 4, 1, 35.96),
    (12, 8, 2, 16.38),
    (13, 2, 1, 349.00),
    (14, 10, 3, 38.25),
    (14, 4, 1, 39.95),
    (14, 13, 4, 44.91),
    (15, 13, 3, 44.91),
    (16, 4, 4, 35.96),
    (17, 5, 2, 44.00),
    (18, 17, 1, 12.60),
    (19, 12, 1, 229.00),
    (20, 12, 1, 206.10),
    (20, 11, 1, 27.00),
    (21, 11, 3, 27.00),
    (21, 7, 1, 32.75),
    (22, 13, 4, 49.90),
    (22, 12, 1, 229.00),
    (22, 7, 2, 29.48),
    (23, 15, 1, 21.40),
    (23, 10, 2, 42.50),
    (24, 10, 1, 42.50),
    (24, 1, 1, 107.91),
    (24, 14, 1, 139.00),
    (25, 1, 1, 119.90),
    (26, 14, 1, 125.10),
    (26, 11, 4, 27.00),
    (27, 13, 2, 49.90),
    (28, 10, 1, 38.25);
