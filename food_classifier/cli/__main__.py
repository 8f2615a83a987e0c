from food_classifier.cli import main

main()
